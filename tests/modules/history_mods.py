"""Modules for the history tests: a flaky one with a Redis counter, slow and fast ones."""

from __future__ import annotations

import time
from typing import Any

import redis

from dspex_celery.errors import TransientError


def flaky(counter: str, redis_url: str, failures: int = 2, **_: Any) -> dict[str, Any]:
    """Fails with a transient error on its first ``failures`` calls (counted in Redis), then succeeds."""
    calls = int(redis.Redis.from_url(redis_url).incr(counter))
    if calls <= failures:
        raise TransientError(f"call {calls} of {failures} planned failures")
    return {"calls": calls}


def nap(seconds: float = 0.05, **_: Any) -> dict[str, Any]:
    """Sleeps ``seconds``; returns them."""
    time.sleep(seconds)
    return {"slept": seconds}


def gate(key: str, redis_url: str, timeout_s: float = 30.0, **_: Any) -> dict[str, Any]:
    """Waits until the Redis key ``key`` exists (the test opens the gate), then returns."""
    client = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + timeout_s
    while not client.exists(key):
        if time.monotonic() > deadline:
            raise TimeoutError(f"gate {key} was never opened")
        time.sleep(0.02)
    return {"opened": key}
