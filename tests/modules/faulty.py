"""Modules that fail, hang or die on purpose, with a Redis side channel to count and steer them.

Every module takes a ``key`` input: its counters and switches live under that Redis key (the test
database of ``tests/conftest.py``), so a test can see what ran and flip behaviour between runs.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import redis
from billiard.exceptions import SoftTimeLimitExceeded

from dspex_celery import TransientError
from tests.modules import suite_redis_url

TTL_S = 600


def side_channel() -> redis.Redis:
    return redis.Redis.from_url(suite_redis_url(), decode_responses=True)


def count_call(key: str, field: str = "calls") -> int:
    """Add one call to ``key``'s ``field``; the new count."""
    client = side_channel()
    calls = int(client.hincrby(key, field, 1))
    client.expire(key, TTL_S)
    return calls


def flaky(key: str, failures: int = 2, **_: Any) -> dict[str, Any]:
    """Fails with a TransientError on its first ``failures`` calls, then succeeds."""
    calls = count_call(key)
    if calls <= failures:
        raise TransientError(f"flaky: call {calls} of {failures} failing ones")
    return {"calls": calls}


def counted(key: str, name: str, value: Any = None, **_: Any) -> dict[str, Any]:
    """Counts its calls per ``name``; fails (ValueError) while ``{key}:broken`` holds ``name``."""
    count_call(key, name)
    if side_channel().sismember(f"{key}:broken", name):
        raise ValueError(f"{name} is broken")
    return {"name": name, "value": value}


def slow_first_call(key: str, seconds: float = 30.0, **_: Any) -> dict[str, Any]:
    """Publishes its pid; sleeps ``seconds`` on its first call only (a test kills it meanwhile)."""
    client = side_channel()
    calls = count_call(key)
    client.rpush(f"{key}:pids", os.getpid())
    client.expire(f"{key}:pids", TTL_S)
    if calls == 1:
        time.sleep(seconds)
    return {"calls": calls, "pid": os.getpid()}


def sleeper(key: str, seconds: float = 30.0, **_: Any) -> dict[str, Any]:
    """Publishes its pid, sleeps, then marks itself done (a cancelled one must never be done)."""
    client = side_channel()
    client.hset(key, "pid", os.getpid())
    client.expire(key, TTL_S)
    time.sleep(seconds)
    client.hset(key, "done", 1)
    return {"slept": seconds}


def ignores_soft_limit(seconds: float = 30.0, **_: Any) -> dict[str, Any]:
    """Swallows the soft time limit and keeps going: only the hard limit stops it."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            time.sleep(0.05)
        except SoftTimeLimitExceeded:
            pass
    return {"finished": True}


def exits(code: int = 3, **_: Any) -> dict[str, Any]:
    """Calls sys.exit, as a careless library might."""
    sys.exit(code)


def dependency(key: str, seconds: float = 0.0, **_: Any) -> dict[str, Any]:
    """A remote dependency: counts calls; fails (ConnectionRefused-like ValueError) while
    ``{key}:down`` exists; takes ``seconds``."""
    client = side_channel()
    calls = count_call(key)
    time.sleep(seconds)
    if client.exists(f"{key}:down"):
        raise ValueError("dependency is down")
    return {"calls": calls, "pid": os.getpid()}
