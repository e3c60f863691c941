"""The published results of many executions read over one pub/sub connection (batch runs).

A batch waits for hundreds of executions at once; one subscription per execution, or polling every
in-flight result, costs the client a round trip (and its CPU) per line and per poll. A
:class:`ResultStream` subscribes each execution's result channel on one connection as it is added
(one ``SUBSCRIBE`` and one ``MGET`` for the executions added since the last read, for results
published before the subscription took effect), hands back results as they are published, and
every :data:`RESCAN_S` reads the results of every execution it still waits for (one ``MGET``), so a
message lost while the connection was re-made is never waited for. A backend without pub/sub
(embedded runs) is polled with that ``MGET``.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import redis
from celery import states
from celery.backends.redis import RedisBackend

from dspex_celery.runtime import Runtime

#: Seconds between two reads of every awaited result (a message lost on a reconnect is found then).
RESCAN_S = 2.0


class ResultStream:
    """Results of the executions :meth:`add`-ed, as Celery result metas, once each."""

    def __init__(self, runtime: Runtime) -> None:
        self.backend = runtime.app.backend
        self.use_pubsub = isinstance(self.backend, RedisBackend)
        self._waiting: dict[bytes, str] = {}  # result key -> execution id
        self._unsubscribed: list[bytes] = []  # added since the last read
        self._pubsub: Any = None
        self._rescan_at = time.monotonic() + RESCAN_S

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, execution_id: str) -> None:
        key = self._key(execution_id)
        self._waiting[key] = execution_id
        self._unsubscribed.append(key)

    def discard(self, execution_id: str) -> None:
        """Stop waiting for ``execution_id`` (its line ended another way)."""
        self._forget([self._key(execution_id)])

    def take(self, timeout: float) -> list[tuple[str, dict[str, Any]]]:
        """The results published so far, waiting up to ``timeout`` seconds for the first one.

        A store error drops the connection (the next call subscribes again) and is raised."""
        if not self._waiting:
            return []
        try:
            found = self._read(timeout)
        except redis.RedisError:
            self.close()
            self._unsubscribed = list(self._waiting)
            raise
        results = dict(found)  # a result both fetched and received is handed out once
        self._forget(list(results))
        return list(results.values())

    def close(self) -> None:
        if self._pubsub is not None:
            pubsub, self._pubsub = self._pubsub, None
            with contextlib.suppress(Exception):  # closing a dead connection
                pubsub.close()

    # --- reading ---

    def _read(self, timeout: float) -> list[tuple[bytes, tuple[str, dict[str, Any]]]]:
        if not self.use_pubsub:  # polled
            found = self._fetch(list(self._waiting))
            if not found and timeout:
                time.sleep(timeout)
            return found
        rescan = time.monotonic() >= self._rescan_at
        if self._unsubscribed or rescan:
            added, self._unsubscribed = self._unsubscribed, []
            self._subscribe(added)
            if rescan:
                self._rescan_at = time.monotonic() + RESCAN_S
            found = self._fetch(list(self._waiting) if rescan else added)  # published before subscribing?
            if found:
                return found
        return self._messages(timeout)

    def _subscribe(self, keys: list[bytes]) -> None:
        if keys:
            if self._pubsub is None:
                self._pubsub = self.backend.client.pubsub(ignore_subscribe_messages=True)
            self._pubsub.subscribe(*keys)

    def _messages(self, timeout: float) -> list[tuple[bytes, tuple[str, dict[str, Any]]]]:
        """Published results: the first within ``timeout``, then every one already received."""
        if self._pubsub is None:
            time.sleep(timeout)
            return []
        found = []
        message = self._pubsub.get_message(timeout=timeout)
        while message is not None:
            if message["type"] == "message":
                key = bytes(message["channel"])
                meta = self._ready(message["data"])
                if meta is not None and key in self._waiting:
                    found.append((key, (self._waiting[key], meta)))
            message = self._pubsub.get_message(timeout=0)
        return found

    def _fetch(self, keys: list[bytes]) -> list[tuple[bytes, tuple[str, dict[str, Any]]]]:
        """The results already stored under ``keys`` (one MGET)."""
        if not keys:
            return []
        values = self.backend.mget(keys)  # a list; a dict of the keys found from a cache backend (embedded)
        stored = values if isinstance(values, dict) else dict(zip(keys, values, strict=True))
        found = []
        for key in keys:
            raw = stored.get(key)
            meta = None if raw is None else self._ready(raw)
            if meta is not None and key in self._waiting:
                found.append((key, (self._waiting[key], meta)))
        return found

    def _ready(self, raw: Any) -> dict[str, Any] | None:
        meta: dict[str, Any] = self.backend.decode_result(raw)
        return meta if meta.get("status") in states.READY_STATES else None

    def _forget(self, keys: list[bytes]) -> None:
        gone = [key for key in dict.fromkeys(keys) if self._waiting.pop(key, None) is not None]
        if gone and self._pubsub is not None:
            with contextlib.suppress(redis.RedisError):  # a dead connection is re-made by the next read
                self._pubsub.unsubscribe(*gone)

    def _key(self, execution_id: str) -> bytes:
        key = self.backend.get_key_for_task(execution_id)
        return key if isinstance(key, bytes) else str(key).encode()
