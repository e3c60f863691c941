"""Program inputs from the command line: ``-i NAME=VALUE`` pairs and ``--inputs FILE.json``; a batch's
``--output`` checked before it runs."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dspex_celery.errors import InputError, beyond_parser_limits, not_utf8
from dspex_celery.spec import non_finite_input


def parse_value(text: str) -> Any:
    """A ``-i`` value: JSON when it parses as JSON, else the string itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
    except (RecursionError, ValueError) as exc:
        if (problem := beyond_parser_limits(exc)) is None:
            raise
        raise InputError(f"an -i value {problem}") from None


def collect_inputs(pairs: tuple[str, ...], inputs_file: str | None) -> dict[str, Any]:
    """Inputs from ``--inputs FILE.json`` overlaid with ``-i NAME=VALUE`` pairs (no NaN or infinity:
    JSON cannot carry them)."""
    values: dict[str, Any] = _read_inputs_file(inputs_file) if inputs_file else {}
    if inputs_file and (problem := non_finite_input(values, f"inputs file {inputs_file}: input")):
        raise InputError(problem)
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or not name:
            raise InputError(f"-i expects NAME=VALUE, got '{pair}'")
        values[name] = parse_value(text)
        if problem := non_finite_input({name: values[name]}, "-i"):
            raise InputError(problem)
    return values


def _read_inputs_file(path: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"inputs file {path} not found: check the path") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"inputs file {path} is {not_utf8(exc)}: save it as UTF-8 JSON") from None
    except OSError as exc:
        raise InputError(f"cannot read inputs file {path} ({exc.strerror}): name a JSON file") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"inputs file {path} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    except (RecursionError, ValueError) as exc:
        if (problem := beyond_parser_limits(exc)) is None:
            raise
        raise InputError(f"inputs file {path} {problem}") from None
    if not isinstance(data, dict):
        raise InputError(f"inputs file {path} must hold a JSON object of input names to values")
    return data


def check_output(target: Path, *kept: tuple[str, str | Path | None]) -> None:
    """Refuse an output the batch could not write at its end, before any line runs: a directory, a
    file in a directory that does not exist, or one of the ``kept`` files it reads (``(option, path)``
    pairs such as ``("--inputs-file", path)``), which the results would replace."""
    for option, path in kept:
        if path is not None and _same_file(target, Path(path)):
            raise InputError(f"--output {target} is the {option} file: the results would replace it; "
                             f"pick another --output, e.g. --output {target.with_name(target.stem + '.results.jsonl')}")
    if target.is_dir():
        raise InputError(f"--output {target} is a directory: name a file, e.g. --output {target / 'results.jsonl'}")
    folder = target.parent
    if not folder.is_dir():
        raise InputError(f"--output {target}: directory {folder} does not exist: create it or pick another path")
    if not os.access(folder, os.W_OK):
        raise InputError(f"--output {target}: directory {folder} is not writable: pick another path")


def _same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one file (through links too); False when either does not exist."""
    try:
        return a.samefile(b)
    except OSError:
        return False
