"""Modules with side effects and their compensations: each appends a line to the file ``log``.

``do:NAME`` when a module runs, ``undo:NAME`` when its compensation runs; switch files next to the log
steer a compensation (``LOG.broken``: it fails; ``LOG.block``: its first call blocks until killed).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any


def _append(log: str, line: str) -> None:
    with open(log, "a", encoding="utf-8") as file:
        file.write(line + "\n")


def step(name: str, log: str, value: int = 0, seconds: float = 0) -> dict[str, Any]:
    """A side effect: ``do:NAME`` in the log (after ``seconds``)."""
    time.sleep(seconds)
    _append(log, f"do:{name}")
    return {"value": value + 1}


def boom(name: str, log: str, value: int = 0) -> dict[str, Any]:
    """Always fails (not transient)."""
    raise ValueError(f"{name} cannot go on with {value}")


def undo(inputs: dict[str, Any], output: dict[str, Any]) -> None:
    """Undo a step: ``undo:NAME:VALUE`` (the step's output) in the log."""
    _append(inputs["log"], f"undo:{inputs['name']}:{output['value']}")


def blocking_undo(inputs: dict[str, Any], output: dict[str, Any]) -> None:
    """The first call writes its pid to ``LOG.block`` and blocks (to be killed); later calls undo."""
    block = Path(inputs["log"] + ".block")
    if not block.exists():
        block.write_text(str(os.getpid()))
        time.sleep(60)
    undo(inputs, output)


def fragile_undo(inputs: dict[str, Any], output: dict[str, Any]) -> None:
    """Fails while ``LOG.broken`` exists (every call counted in the log), else undoes."""
    if Path(inputs["log"] + ".broken").exists():
        _append(inputs["log"], f"fail:{inputs['name']}")
        raise RuntimeError(f"the index of {inputs['name']} is unavailable")
    undo(inputs, output)


def wrong_signature(value: int) -> None:
    """Not a compensation: it does not take ``inputs`` and ``output``."""
