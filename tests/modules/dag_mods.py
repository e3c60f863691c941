"""Modules for dag-strategy tests: call counting through Redis, and timed work."""

from __future__ import annotations

import time
from functools import cache
from typing import Any

import redis

from tests.modules import suite_redis_url


@cache
def _redis() -> redis.Redis:
    return redis.Redis.from_url(suite_redis_url(), decode_responses=True)


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
