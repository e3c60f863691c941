"""Modules for worker-local continuation tests: each output says which Celery task ran it."""

from __future__ import annotations

import time
from functools import cache
from typing import Any

import redis
from celery import current_task

from tests.modules import suite_redis_url


@cache
def _redis() -> redis.Redis:
    return redis.Redis.from_url(suite_redis_url(), decode_responses=True)


def step(ms: float = 0.0, **inputs: Any) -> dict[str, Any]:
    """Sleeps ``ms``; ``value`` = 1 + the sum of numeric inputs; ``task``: the id of the Celery task
    that ran this call (a continued module runs inside its parent's task)."""
    if ms:
        time.sleep(ms / 1000)
    total = 1 + sum(v for v in inputs.values() if isinstance(v, int | float) and not isinstance(v, bool))
    return {"value": total, "task": current_task.request.id}


def announced(key: str, ms: float, **inputs: Any) -> dict[str, Any]:
    """Pushes the id of the task running it onto the list ``key`` (a side channel), then sleeps ``ms``."""
    _redis().rpush(key, str(current_task.request.id))
    _redis().expire(key, 3600)
    return step(ms, **inputs)
