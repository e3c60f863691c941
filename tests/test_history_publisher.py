"""The history publisher of a cluster process: what the script that publishes a result carries."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import redis

from dspex_celery import ExecutionStatus, create_runtime, submit_program
from dspex_celery.execution import Execution
from dspex_celery.history.events import FinishedEvent, RecordEvent, decode
from dspex_celery.history.hooks import StreamPublisher, stream_key
from dspex_celery.results import ModuleRecord, ModuleStatus
from dspex_celery.runtime import Runtime
from tests.conftest import new_settings, program

ONE_MODULE = program("publisher", {"only": {"uses": "tests.modules.basic:add", "inputs": {"a": 1, "b": 2}}})


def stream_events(runtime: Runtime) -> list[Any]:
    entries = runtime.store.client.xrange(stream_key(runtime.settings.namespace))
    return [decode(dict(fields)) for _, fields in entries]


def publisher_of(runtime: Runtime) -> StreamPublisher:
    return next(hook for hook in runtime.hooks.hooks if isinstance(hook, StreamPublisher))


@pytest.mark.filterwarnings("ignore::dspex_celery.errors.UnservedResourceWarning")
def test_a_failed_publication_loses_no_record_event_and_the_next_one_sends_its_finished_event(
        redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a client runtime whose history publisher holds a queued record event of another execution
    # (its background sender left out, so the event waits in the queue for the next publication)
    runtime = create_runtime(new_settings(redis_url, history_url=f"sqlite:///{tmp_path / 'h.db'}"))
    publisher = publisher_of(runtime)
    monkeypatch.setattr(publisher, "_start", lambda: None)
    publisher.on_record("other-execution", "m", ModuleRecord(status=ModuleStatus.RUNNING, attempts=1))
    handle = submit_program(ONE_MODULE, {}, app=runtime.app)  # no worker: it stays pending
    # and a Redis that fails the script publishing the result once
    real_publish = runtime.store.publish_result
    calls: list[int] = []

    def fails_once(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise redis.ConnectionError("connection reset")
        real_publish(*args, **kwargs)

    monkeypatch.setattr(runtime.store, "publish_result", fails_once)
    execution = Execution(runtime, handle.execution_id)
    # When the execution is cancelled and its publication fails
    with pytest.raises(redis.ConnectionError):
        execution.finish(ExecutionStatus.CANCELLED, "cancelled on request")
    # Then the record event that publication carried is in the stream all the same
    events = stream_events(runtime)
    assert [(e.execution_id, e.module) for e in events if isinstance(e, RecordEvent)][:1] == [("other-execution", "m")]
    assert not any(isinstance(e, FinishedEvent) for e in events)
    # When the abandoned finish is taken over (as a waiting client or a re-delivered task does)
    assert execution.finish_abandoned(runtime.store.meta(handle.execution_id), older_than=0)
    # Then its finished event is in the stream once, and the publisher holds nothing for it
    finished = [e for e in stream_events(runtime) if isinstance(e, FinishedEvent)]
    assert [(e.execution_id, e.result.status) for e in finished] == [(handle.execution_id, ExecutionStatus.CANCELLED)]
    assert publisher._in_script == {}
