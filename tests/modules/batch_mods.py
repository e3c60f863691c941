"""A batch test module that records, per line, when it started and finished (a Redis side channel)."""

from __future__ import annotations

import time
from typing import Any

import redis

from tests.modules import suite_redis_url

TTL_S = 600


def step(key: str, line: str, tag: str, seconds: float = 0.0, **_: Any) -> dict[str, Any]:
    """Counts ``TAG:LINE`` in the hash ``{key}:started``, sleeps ``seconds``, counts it in
    ``{key}:finished``; outputs the line tagged with the program's ``tag``."""
    client = redis.Redis.from_url(suite_redis_url())
    _count(client, f"{key}:started", f"{tag}:{line}")
    time.sleep(seconds)
    _count(client, f"{key}:finished", f"{tag}:{line}")
    return {"echo": f"{tag}:{line}"}


def _count(client: redis.Redis, key: str, field: str) -> None:
    client.hincrby(key, field, 1)
    client.expire(key, TTL_S)
