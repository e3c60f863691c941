"""Reusable daemon threads for calls that the caller waits for with a timeout.

Where Celery's time limits do nothing (threads and solo pools, the embedded worker), a module's
``timeout_s`` is enforced by running its call in another thread and waiting at most that long.
Starting a thread per call costs more than many module calls; these threads are reused once their
call returns. A call that outlives its timeout keeps its thread until it returns (Python cannot
stop it); a new thread is started whenever no idle one is left. Daemon threads: a hung call never
blocks the worker's exit. That is what ``concurrent.futures.ThreadPoolExecutor`` cannot give: its
threads are joined at interpreter exit, so an abandoned call would hold a stopping worker for as
long as the call hangs (and a bounded pool would run out of threads to hung calls).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

_Job = tuple[Future[Any], Callable[[], Any]]


class CallThreads:
    """Run calls on reused daemon threads; every queued call has an idle thread of its own."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._idle = 0
        self._started = 0
        self._lock = threading.Lock()

    def submit(self, call: Callable[[], Any]) -> Future[Any]:
        """Start ``call`` now on an idle (or new) thread; its future holds the value or the error."""
        future: Future[Any] = Future()
        with self._lock:
            if self._idle:
                self._idle -= 1
            else:
                self._started += 1
                threading.Thread(target=self._serve, name=f"{self.name}-{self._started}", daemon=True).start()
        self._jobs.put((future, call))
        return future

    def _serve(self) -> None:
        while True:
            future, call = self._jobs.get()
            try:
                future.set_result(call())
            except BaseException as exc:  # handed to whoever waits on the future
                future.set_exception(exc)
            del future, call  # drop the finished call's references while idle
            with self._lock:
                self._idle += 1
