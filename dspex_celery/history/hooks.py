"""Where history events come from: hooks on every record write and every finished execution.

Cluster processes (workers, clients that finish a timed-out execution) publish to a Redis stream
per namespace, ``{ns}:history``, which ``dspex-celery listener`` consumes. The listener reconciles
from the state store too (module records, plus every finished attempt: ``StateStore.attempts``).
Embedded runs write history in-process, from a background thread.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
import time
from typing import Any

from dspex_celery.history.events import (
    Event,
    FinishedEvent,
    describe,
    encode,
    finished_result,
    record_event,
)
from dspex_celery.history.location import history_url
from dspex_celery.hooks import Hook
from dspex_celery.results import ExecutionResult, ModuleRecord
from dspex_celery.settings import Settings, redact
from dspex_celery.state import LuaStep, StateStore, lua_call

log = logging.getLogger(__name__)

#: Approximate length cap of the history stream: what a listener that is down can catch up on
#: from the stream; older events are still reconciled from the state store.
STREAM_MAXLEN = 100_000

#: Events written per transaction by the embedded recorder (and per pipeline by the publisher).
BATCH = 500

#: Seconds the publisher lets record events gather after the first, so they go out in batches.
PUBLISH_DELAY_S = 0.02


def stream_key(namespace: str) -> str:
    return f"{namespace}:history"


def history_hooks(settings: Settings) -> list[Hook]:
    """The history hook of a runtime: publish (cluster) or record in-process (embedded); none when off."""
    url = history_url(settings)
    if url is None:
        return []
    return [EmbeddedRecorder(settings, url)] if settings.embedded else [StreamPublisher(settings)]


class StreamPublisher(Hook):
    """Appends every record change and finished execution to the namespace's history stream.

    Record events are sent by a background thread of the publishing process (in batches: one
    round trip for what queued up within :data:`PUBLISH_DELAY_S`), off the module's critical path; a finished execution is
    sent at once, after the record events queued before it. Events a killed process still held
    are not lost to history: the finished event carries every final record, and the listener
    reconciles from the state store (records and attempt logs).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stream = stream_key(settings.namespace)
        self._store: StateStore | None = None
        self._queue: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        #: Executions whose finished event a publish script carries (on_execution_finished sends none),
        #: with the record events that script carries (sent again if it fails).
        self._in_script: dict[str, list[Event]] = {}

    @property
    def store(self) -> StateStore:
        if self._store is None or self._pid != os.getpid():  # after fork: this process's own connection
            assert self.settings.state_url is not None
            self._store = StateStore.from_url(self.settings.state_url, self.settings.namespace, self.settings.state_ttl_s,
                                              self.settings.sentinel_master)
            self._pid = os.getpid()
        return self._store

    def on_record(self, execution_id: str, module: str, record: ModuleRecord) -> None:
        self._start()
        self._queue.put(record_event(self.settings.namespace, execution_id, module, record))

    def publish_step(self, result: ExecutionResult) -> LuaStep:
        """The record events queued so far, then the finished event, appended by the script that
        publishes the result: no round trip of their own, and no window in which the result is out and
        its finished event is not."""
        records = _drain(self._queue)
        with self._lock:
            self._in_script[result.execution_id] = records
        return LuaStep(_XADD_EVENTS, [self.stream], _xadd_args([*records, FinishedEvent(result)]))

    def publish_failed(self, result: ExecutionResult) -> None:
        """The script did not run: send the record events it carried (of any execution of this
        process) on their own; its finished event goes out with the publication that comes next."""
        with self._lock:
            records = self._in_script.pop(result.execution_id, [])
        if records:
            self._send(records)

    def on_execution_finished(self, result: ExecutionResult) -> None:
        """The record events queued so far, then the finished event, in one round trip (unless the
        script that published the result sent them: :meth:`publish_step`)."""
        with self._lock:
            if self._in_script.pop(result.execution_id, None) is not None:
                return
        self._send([*_drain(self._queue), FinishedEvent(result)])

    def on_compensation(self, result: ExecutionResult) -> None:
        """The row's compensations (applying a finished event again is idempotent)."""
        self._send([*_drain(self._queue), FinishedEvent(result)])

    def flush(self) -> None:
        """Send every record event queued so far (in this thread)."""
        items = _drain(self._queue)
        if items:
            self._send(items)

    def _start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():  # none yet, or not in this (forked) process
                self._thread = threading.Thread(target=self._loop, name="dspex-history-publisher", daemon=True)
                self._thread.start()
                atexit.register(self.flush)

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            time.sleep(PUBLISH_DELAY_S)
            self._send([first, *_drain(self._queue)])

    def _send(self, items: list[Event]) -> None:
        try:
            with self._send_lock:  # one batch at a time keeps a module's events in order
                # one script, not a pipeline of XADDs: a worker sends ~2 events per module, and redis-py's
                # pipeline costs far more CPU per command than a store script's call (StoreScript)
                self.store.script(_XADD_ALONE)(keys=[self.stream], args=_xadd_args(items))
        except Exception:  # history must never break a run; the listener reconciles from the store
            log.exception("could not publish %d history events to %s", len(items), self.stream)


# A LuaStep body — KEYS[k]: the history stream. ARGV[a..]: its approximate length bound, the number of
# events, then per event the number of its field and value items and the items.
_XADD_EVENTS = """
local at = a + 2
for _ = 1, tonumber(ARGV[a + 1]) do
  local count = tonumber(ARGV[at])
  redis.call('XADD', KEYS[k], 'MAXLEN', '~', ARGV[a], '*', unpack(ARGV, at + 1, at + count))
  at = at + count + 1
end
"""
_XADD_ALONE = "local _ = " + lua_call(_XADD_EVENTS, 1, 1)


def _xadd_args(items: list[Event]) -> list[Any]:
    """ARGV of :data:`_XADD_EVENTS` for these events, in order."""
    args: list[Any] = [STREAM_MAXLEN, len(items)]
    for item in items:
        fields = [part for pair in encode(item).items() for part in pair]
        args += [len(fields), *fields]
    return args


def _drain(events: queue.SimpleQueue[Event]) -> list[Event]:
    items: list[Event] = []
    while len(items) < BATCH:
        try:
            items.append(events.get_nowait())
        except queue.Empty:
            break
    return items


class EmbeddedRecorder(Hook):
    """Writes history from a background thread of this process (embedded mode)."""

    def __init__(self, settings: Settings, url: str) -> None:
        self.settings = settings
        self.url = url
        self.events: queue.Queue[Event | None] = queue.Queue()
        self.seen: set[str] = set()
        self.finished: set[str] = set()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def store(self) -> StateStore:
        return StateStore.in_memory(self.settings.namespace, self.settings.state_ttl_s)

    def on_record(self, execution_id: str, module: str, record: ModuleRecord) -> None:
        self._put(record_event(self.settings.namespace, execution_id, module, record))

    def on_execution_finished(self, result: ExecutionResult) -> None:
        self._put(FinishedEvent(result))

    on_compensation = on_execution_finished  # the row's compensations (applying it again is idempotent)

    def _put(self, item: Event) -> None:
        self._start()
        self.events.put(item)

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="dspex-history", daemon=True)
                self._thread.start()
                atexit.register(self.close)

    def _loop(self) -> None:
        store = self.store
        while True:
            batch = [self.events.get()]
            while len(batch) < BATCH and not self.events.empty():
                batch.append(self.events.get())
            items = [item for item in batch if item is not None]
            self._write(items, store)
            for _ in batch:
                self.events.task_done()
            if None in batch:
                return

    def _write(self, items: list[Event], store: StateStore) -> None:
        from dspex_celery.history.store import open_history

        try:
            open_history(self.url).apply(items, lambda execution_id: describe(store, execution_id))
        except Exception:  # history must never break a run
            log.exception("could not write execution history to %s", redact(self.url))
        self.seen.update(item.execution_id for item in items)
        self.finished.update(item.execution_id for item in items if isinstance(item, FinishedEvent))

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until every event queued so far is written."""
        deadline = time.monotonic() + timeout
        while self.events.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)

    def close(self) -> None:
        """At exit: write what is queued, and finish executions whose finish event is still on its way."""
        if self._thread is None or not self._thread.is_alive():
            return
        self.flush()
        store = self.store
        for execution_id in self.seen - self.finished:
            result = finished_result(store, execution_id)
            if result is not None:
                self.events.put(FinishedEvent(result))
        self.events.put(None)
        self._thread.join(timeout=10)

