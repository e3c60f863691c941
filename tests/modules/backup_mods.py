"""Modules for the straggler-backup tests: a call that stalls on its first attempt only."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from tests.modules.rate_limit_mods import client


def stall_first(key: str, stall_s: float = 30.0, **_: Any) -> dict[str, Any]:
    """The first call (counted under ``key``) stalls for ``stall_s``; later ones return at once.
    Each call logs ``{call, pid}`` to ``key:calls`` and, if it returns, ``call`` to ``key:returned``."""
    store = client()
    call = int(store.incr(f"{key}:n"))
    store.rpush(f"{key}:calls", json.dumps({"call": call, "pid": os.getpid()}))
    if call == 1:
        time.sleep(stall_s)
    store.rpush(f"{key}:returned", call)
    return {"call": call}


def slow_then_fail(key: str, seconds: float = 1.5, fail_calls: tuple[int, ...] = (1,), **_: Any) -> dict[str, Any]:
    """Takes ``seconds``, then fails for good (ValueError) if it is one of the ``fail_calls``-th calls."""
    call = int(client().incr(f"{key}:n"))
    time.sleep(seconds)
    if call in fail_calls:
        raise ValueError(f"call {call} failed for good")
    return {"call": call}
