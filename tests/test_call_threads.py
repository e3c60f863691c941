"""Reused call threads: how ``timeout_s`` is enforced outside prefork pool children."""

from __future__ import annotations

import signal
import threading
import time
import uuid

import pytest

from dspex_celery import ExecutionStatus
from dspex_celery.call_threads import CallThreads
from tests.conftest import Cluster, program


def test_a_call_returns_its_value_and_the_thread_is_reused() -> None:
    threads = CallThreads("test")
    assert threads.submit(lambda: 2 + 2).result(timeout=5) == 4
    names = {threads.submit(lambda: threading.current_thread().name).result(timeout=5) for _ in range(20)}
    assert len(names) == 1  # one call at a time: always the same (reused) thread


def test_a_calls_own_timeout_error_reaches_the_caller() -> None:
    def times_out() -> None:
        raise TimeoutError("upstream timed out")

    with pytest.raises(TimeoutError, match="upstream timed out"):
        CallThreads("test").submit(times_out).result(timeout=5)


def test_a_hung_call_does_not_hold_up_the_next_one() -> None:
    threads = CallThreads("test")
    release = threading.Event()
    hung = threads.submit(lambda: release.wait(30))
    try:
        assert threads.submit(lambda: "next").result(timeout=5) == "next"
        assert not hung.done()
    finally:
        release.set()
    assert hung.result(timeout=5) is True


@pytest.mark.integration
def test_a_threads_pool_worker_stops_at_once_after_abandoning_a_hung_call(make_cluster) -> None:
    # Given a threads-pool worker whose module outlived its timeout_s (the call is abandoned, still running)
    cluster: Cluster = make_cluster()
    worker = cluster.start_worker(concurrency=1, pool="threads")
    sleeper = {"uses": "tests.modules.basic:sleep", "inputs": {"seconds": 40}, "timeout_s": 0.5,
               "retry": {"max_attempts": 1}}
    hung = program(f"hung_{uuid.uuid4().hex[:6]}", {"s": sleeper})
    result = cluster.run(hung, timeout=30)
    assert result.status is ExecutionStatus.FAILED and "abandoned" in (result.modules["s"].error or "")
    # When it is stopped (warm shutdown)
    started = time.monotonic()
    worker.process.send_signal(signal.SIGTERM)
    # Then it exits by itself, without waiting for the hung call to return
    assert worker.process.wait(timeout=30) == 0
    assert time.monotonic() - started < 15
