"""Modules for the operations tests: flaky calls, long holds and hostile error messages."""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

from dspex_celery.errors import TransientError


def flaky(marker_dir: str, key: str, fail_times: int = 1, **_: Any) -> dict[str, Any]:
    """Fails with a transient error on its first ``fail_times`` calls (counted in files), then succeeds."""
    calls = Path(marker_dir) / f"{key}.calls"
    count = int(calls.read_text()) + 1 if calls.exists() else 1
    calls.write_text(str(count))
    if count <= fail_times:
        raise TransientError(f"flaky call {count} of {key}")
    return {"calls": count}


def hold(seconds: float = 0.2, **_: Any) -> dict[str, Any]:
    """Holds its worker slot for ``seconds``; reports when it ran."""
    started = time.time()
    time.sleep(seconds)
    return {"started": started, "finished": time.time()}


def hostile(**_: Any) -> dict[str, Any]:
    """Fails with an error message full of HTML."""
    raise ValueError("<script>alert('pwned')</script> & <img src=x onerror=alert(1)> \"quoted\"")


def gc_state(**_: Any) -> dict[str, Any]:
    """The worker process's garbage collector: how many objects it keeps frozen, and whether it runs."""
    return {"frozen": gc.get_freeze_count(), "enabled": gc.isenabled()}
