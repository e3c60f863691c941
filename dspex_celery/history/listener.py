"""The history listener: consumes the history stream with a consumer group and writes the database.

Restart-safe: an event is acknowledged only after its transaction committed, so a listener killed
mid-batch re-reads its pending events on start (writes are idempotent). On start it also
reconciles every execution the state store still holds that history does not have as finished,
so events trimmed from the stream or published before any listener existed are not lost either.

Outage-safe: while Redis or the database does not answer it logs one warning and tries again every
:data:`RETRY_AFTER_ERROR_S`; when Redis comes back without the consumer group (restarted without
persistence) it recreates the group and reconciles again, as on start.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterable
from typing import Any

import redis
from sqlalchemy.exc import DataError, IntegrityError, InterfaceError, OperationalError

from dspex_celery.errors import reason_of
from dspex_celery.history.events import Event, decode, describe, snapshot
from dspex_celery.history.hooks import stream_key
from dspex_celery.history.store import HistoryStore
from dspex_celery.runtime import Runtime
from dspex_celery.settings import redact

log = logging.getLogger(__name__)

#: Default consumer group: listeners writing the same database share it (each event is written once).
GROUP = "history"
#: Pending events of another consumer idle this long are taken over (that listener is gone).
CLAIM_IDLE_MS = 60_000
RETRY_AFTER_ERROR_S = 2.0
#: How many executions a listener remembers having written (see Listener.end_lost).
SEEN_BOUND = 100_000
LOST_ERROR = "its state is gone (Redis restarted without persistence?): it can never finish"


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
        #: What has kept the listener from writing since its last success (None: all is well).
        self.trouble: str | None = None
        #: Executions this listener wrote events of (this namespace's, bounded): when Redis comes back
        #: without its data, those that did not finish and whose state is gone are ended in history.
        self.seen: dict[str, None] = {}

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
        """Write events until ``stop`` is set: first this consumer's pending ones, then new ones.

        An outage leaves the events in the stream (pending or unread): they are written once it is over.
        """
        start = "0"
        while not stop.is_set():
            try:
                handled = self.poll(start)
            except Exception as exc:
                start = "0"
                if self.recover(exc):
                    stop.wait(RETRY_AFTER_ERROR_S)
                continue
            self.recovered()
            if start == "0" and not handled:
                start = ">"

    def recover(self, exc: Exception) -> bool:
        """Handle what stopped a poll; True when the listener should wait before the next one."""
        if _group_gone(exc):
            self.note(f"consumer group '{self.group}' of {self.stream} is gone (Redis restarted without "
                      "persistence?): recreating it and reconciling")
            try:
                lost = self.end_lost()
                reconciled = self.start()
            except Exception as again:  # Redis went away again, or the database is down
                exc = again
            else:
                log.info("history listener: consumer group '%s' recreated, %d execution(s) reconciled, "
                         "%d whose state is gone ended as failed", self.group, reconciled, lost)
                return False
        self.note(self.outage(exc) or f"could not write events ({reason_of(exc)})", exc,
                  f"; retrying every {RETRY_AFTER_ERROR_S:g} s")
        return True

    def note(self, trouble: str, exc: Exception | None = None, then: str = "") -> None:
        """Log ``trouble`` once: one warning per incident (an outage, a lost group), no traceback.

        An unexpected error (a bug) is logged with its traceback, once per distinct message.
        """
        unexpected = exc is not None and self.outage(exc) is None
        if unexpected and trouble != self.trouble:
            log.error("history listener: %s%s", trouble, then, exc_info=exc)
        elif self.trouble is None:
            log.warning("history listener: %s%s", trouble, then)
        if self.trouble is None or unexpected:
            self.trouble = trouble

    def recovered(self) -> None:
        if self.trouble is not None:
            log.info("history listener: writing again after: %s", self.trouble)
            self.trouble = None

    def outage(self, exc: Exception) -> str | None:
        """A one-line description when ``exc`` is Redis or the database not answering, else None."""
        if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
            return f"cannot reach Redis at {redact(self.runtime.settings.state_url)} ({reason_of(exc)})"
        if isinstance(exc, OperationalError | InterfaceError):
            return f"cannot write the history database {self.history.display_url} ({reason_of(exc)})"
        return None

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
        for item in events:
            self.seen[item.execution_id] = None
        while len(self.seen) > SEEN_BOUND:
            del self.seen[next(iter(self.seen))]

    def end_lost(self) -> int:
        """End in history the executions it saw that did not finish and whose state the store lost."""
        done = self.history.final_ids(list(self.seen))
        open_ids = [execution_id for execution_id in self.seen if execution_id not in done]
        lost = [execution_id for execution_id, kept in zip(open_ids, self.store.exist(open_ids), strict=True)
                if not kept]
        for execution_id in (*done, *lost):
            self.seen.pop(execution_id, None)
        return self.history.mark_state_lost(lost, LOST_ERROR)

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
        stored = (self.store.execution_of(key) for key in self.client.scan_iter(match=pattern, count=1000))
        return list(dict.fromkeys([*live, *stored]))

    def _published(self, execution_id: str) -> dict[str, Any] | None:
        meta = self.runtime.app.backend.get_task_meta(execution_id)
        result = meta.get("result")
        return result if meta.get("status") == "SUCCESS" and isinstance(result, dict) else None


def _group_gone(exc: Exception) -> bool:
    """The stream's consumer group no longer exists (UNBLOCKED: deleted while this listener waited)."""
    return isinstance(exc, redis.ResponseError) and str(exc).startswith(("NOGROUP", "UNBLOCKED"))


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
