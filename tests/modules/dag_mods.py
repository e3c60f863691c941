"""Modules for dag-strategy tests: call counting through Redis, and timed work."""

from __future__ import annotations

import os
import time
from functools import cache
from typing import Any

import redis


@cache
def _redis() -> redis.Redis:
    url = os.environ.get("DSPEX_RESULT_BACKEND") or os.environ.get("DSPEX_BROKER_URL") or "redis://127.0.0.1:6379/3"
    return redis.Redis.from_url(url, decode_responses=True)


def counted(key: str, ms: float = 0.0, **inputs: Any) -> dict[str, Any]:
    """Counts its calls under ``key`` (a side channel), sleeps ``ms``, sums numeric inputs + 1."""
    _redis().incr(key)
    _redis().expire(key, 3600)
    if ms:
        time.sleep(ms / 1000)
    return {"value": 1 + sum(v for v in inputs.values() if isinstance(v, int | float) and not isinstance(v, bool))}


def calls(key: str) -> int:
    value = _redis().get(key)
    return int(value) if value else 0
