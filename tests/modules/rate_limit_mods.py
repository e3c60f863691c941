"""A fake LM that answers "429 Too Many Requests" (with Retry-After) above a number of concurrent
calls, counted in a Redis key of the test's own; every call and every 429 is logged there too."""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from tests.modules import suite_redis_url

_clients: dict[str, redis.Redis] = {}


class Response:
    """The part of an HTTP response (httpx-like) an LM client's error carries."""

    def __init__(self, status_code: int, headers: dict[str, str]) -> None:
        self.status_code = status_code
        self.headers = headers


class TooManyRequests(Exception):
    """What an LM client raises on HTTP 429: the status and the response with its Retry-After."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.status_code = 429
        self.response = Response(429, {"Retry-After": f"{retry_after_s:g}"})


def client(url: str | None = None) -> redis.Redis:
    url = url or suite_redis_url()
    if url not in _clients:
        _clients[url] = redis.Redis.from_url(url, decode_responses=True)
    return _clients[url]


def limited_lm(question: str, key: str, limit: int = 4, seconds: float = 0.15, retry_after_s: float = 0.5,
               redis_url: str | None = None, **_: Any) -> dict[str, Any]:
    """Answers ``question`` after ``seconds``; raises :class:`TooManyRequests` when more than
    ``limit`` calls (sharing ``key``) run at once. Logs ``{in_flight, at, status}`` of every call to
    ``key:calls``."""
    store = client(redis_url)
    in_flight = int(store.incr(f"{key}:in_flight"))
    try:
        status = 429 if in_flight > limit else 200
        store.rpush(f"{key}:calls", json.dumps({"in_flight": in_flight, "at": time.time(), "status": status}))
        if status == 429:
            raise TooManyRequests(f"429 Too Many Requests: {in_flight} calls at once, limit {limit}", retry_after_s)
        time.sleep(seconds)
        return {"answer": question.upper()}
    finally:
        store.decr(f"{key}:in_flight")
