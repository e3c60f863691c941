"""The LM of ``bench_rate_limits.py``: ``latency_s`` per call, HTTP 429 with Retry-After above
``limit`` concurrent calls (counted in Redis under ``key``, with the number of 429s it answered);
with ``lockout_s``, a 429 also refuses every call for that long (a provider's exhausted window)."""

from __future__ import annotations

import time
from typing import Any

import redis

_clients: dict[str, redis.Redis] = {}


class Response:
    def __init__(self, retry_after_s: float) -> None:
        self.status_code = 429
        self.headers = {"Retry-After": f"{retry_after_s:g}"}


class TooManyRequests(Exception):
    """What an LM client raises on HTTP 429 (status and response with its Retry-After)."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.status_code = 429
        self.response = Response(retry_after_s)


def answer(question: str, key: str, redis_url: str, limit: int, latency_s: float = 0.1,
           retry_after_s: float = 0.5, lockout_s: float = 0.0, **_: Any) -> dict[str, Any]:
    """Answers after ``latency_s``, or raises :class:`TooManyRequests` above ``limit`` calls at once
    (or while a lockout lasts)."""
    store = _clients.setdefault(redis_url, redis.Redis.from_url(redis_url))
    in_flight = int(store.incr(f"{key}:in_flight"))
    try:
        if in_flight > limit or store.exists(f"{key}:locked"):
            store.incr(f"{key}:429")
            if lockout_s:
                store.set(f"{key}:locked", 1, px=int(lockout_s * 1000))
            raise TooManyRequests(f"429 Too Many Requests ({in_flight} at once, limit {limit})", retry_after_s)
        time.sleep(latency_s)
        return {"answer": question.upper()}
    finally:
        store.decr(f"{key}:in_flight")
