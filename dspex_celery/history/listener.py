"""The history listener: consumes the history stream with a consumer group and writes the database.

Restart-safe: an event is acknowledged only after its transaction committed, so a listener killed
mid-batch re-reads its pending events on start (writes are idempotent). On start it also
reconciles every execution the state store still holds that history does not have as finished,
so events trimmed from the stream or published before any listener existed are not lost either.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterable
from typing import Any

import redis
from sqlalchemy.exc import DataError, IntegrityError

from dspex_celery.history.events import Event, decode, describe, snapshot
from dspex_celery.history.hooks import stream_key
from dspex_celery.history.store import HistoryStore
from dspex_celery.runtime import Runtime

log = logging.getLogger(__name__)

#: Default consumer group: listeners writing the same database share it (each event is written once).
GROUP = "history"
#: Pending events of another consumer idle this long are taken over (that listener is gone).
CLAIM_IDLE_MS = 60_000
RETRY_AFTER_ERROR_S = 2.0


def default_consumer() -> str:
    return f"listener@{socket.gethostname()}"


class Listener:
    """One consumer of a namespace's history stream."""

    def __init__(
        self, runtime: Runtime, history: HistoryStore, consumer: str | None = None, *, group: str = GROUP,
        batch: int = 500, block_ms: int = 1000,
    ) -> None:
        self.runtime = runtime
        self.store = runtime.store
        self.client: redis.Redis = runtime.store.client
        self.history = history
        self.consumer = consumer or default_consumer()
        self.group = group
        self.stream = stream_key(runtime.settings.namespace)
        self.batch = batch
        self.block_ms = block_ms

    def start(self) -> int:
        """Join the consumer group, take over abandoned events, reconcile; returns executions reconciled."""
        try:
            self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self.client.xautoclaim(self.stream, self.group, self.consumer, CLAIM_IDLE_MS, justid=True)
        return self.reconcile()

    def run(self, stop: threading.Event) -> None:
        """Write events until ``stop`` is set: first this consumer's pending ones, then new ones."""
        start = "0"
        while not stop.is_set():
            try:
                handled = self.poll(start)
            except Exception:  # a database or Redis outage: the events stay pending; try again
                log.exception("history listener: could not write events; retrying")
                start = "0"
                stop.wait(RETRY_AFTER_ERROR_S)
                continue
            if start == "0" and not handled:
                start = ">"

    def poll(self, start: str) -> int:
        """Read, write and acknowledge one batch; returns how many stream entries it handled."""
        block = None if start == "0" else self.block_ms
        reply: Any = self.client.xreadgroup(self.group, self.consumer, {self.stream: start}, count=self.batch, block=block)
        entries: list[tuple[str, dict[str, str] | None]] = reply[0][1] if reply else []
        if not entries:
            return 0
        self.write_or_skip(_decoded(entries))
        self.client.xack(self.stream, self.group, *[entry_id for entry_id, _ in entries])
        return len(entries)

    def write(self, events: list[Event]) -> None:
        self.history.apply(events, lambda execution_id: describe(self.store, execution_id))

    def write_or_skip(self, events: list[Event]) -> None:
        """Write a batch; if the database rejects its data, write event by event and skip the bad ones.

        Outages (connection errors) are raised: the batch stays pending and is read again.
        """
        try:
            self.write(events)
        except (DataError, IntegrityError):
            for item in events:
                try:
                    self.write([item])
                except (DataError, IntegrityError) as exc:
                    log.error("history listener: skipping an event of execution %s (%s)", item.execution_id, exc)

    # --- reconciliation from the state store ------------------------------------------------------

    def reconcile(self) -> int:
        """Write what the state store knows of every execution history has not seen finish."""
        candidates = self.known_executions()
        done = self.history.final_ids(candidates)
        pending = [execution_id for execution_id in candidates if execution_id not in done]
        for execution_id in pending:
            self.write(snapshot(self.store, execution_id, self._published(execution_id)))
        return len(pending)

    def known_executions(self) -> list[str]:
        """Live executions, then every execution whose plan is still in the state store."""
        live = self.store.live_executions()
        pattern = self.store.key("*", "plan")
        stored = (key.split(":")[-2] for key in self.client.scan_iter(match=pattern, count=1000))
        return list(dict.fromkeys([*live, *stored]))

    def _published(self, execution_id: str) -> dict[str, Any] | None:
        meta = self.runtime.app.backend.get_task_meta(execution_id)
        result = meta.get("result")
        return result if meta.get("status") == "SUCCESS" and isinstance(result, dict) else None


def _decoded(entries: Iterable[tuple[str, dict[str, str] | None]]) -> list[Event]:
    events = []
    for entry_id, fields in entries:
        if not fields:
            continue  # trimmed from the stream while pending
        try:
            events.append(decode(fields))
        except (KeyError, ValueError):
            log.warning("history listener: skipping malformed event %s", entry_id)
    return events
