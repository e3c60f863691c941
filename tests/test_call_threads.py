"""Reused call threads: how ``timeout_s`` is enforced outside prefork pool children."""

from __future__ import annotations

import threading

import pytest

from dspex_celery.call_threads import CallThreads


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
