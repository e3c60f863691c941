"""Messages a worker cannot take in are dropped with a log line naming the reason: every worker
stays up and serves the next execution (Redis and RabbitMQ brokers, resource and control queues).
A run_module message for a module the execution does not have changes nothing."""

from __future__ import annotations

import base64
import json
import os
import uuid
from typing import Any

import kombu
import pytest
import redis

from dspex_celery import ExecutionStatus
from dspex_celery.redis_queues import RedisQueues
from dspex_celery.routing import PRIORITY_LEVELS
from tests.conftest import Cluster, WorkerProcess, program, wait_for
from tests.modules.faulty import side_channel

pytestmark = pytest.mark.integration

BASIC = "tests.modules.basic"
FAULTY = "tests.modules.faulty"
HUGE_BYTES = 4_000_000


@pytest.fixture(scope="module")
def cluster(make_cluster) -> Cluster:
    """Two workers, each with a resource class of its own besides `default`: a prefork and a threads one."""
    cluster = make_cluster()
    cluster.start_worker("default", "a", concurrency=2)
    cluster.start_worker("default", "b", concurrency=2, pool="threads")
    return cluster


def template(cluster: Cluster) -> dict[str, Any]:
    """The kombu envelope of a genuine run_module message, as the engine pushes it."""
    app = cluster.runtime.app
    signature = app.signature("dspex.run_module", args=("no-such-execution", "m"), kwargs={},
                              queue=f"{cluster.settings.namespace}.default", priority=0, task_id=uuid.uuid4().hex)
    _, message = RedisQueues(app, tuple(range(PRIORITY_LEVELS))).message(signature)
    return dict(json.loads(message))


def with_changes(envelope: dict[str, Any], **changes: Any) -> bytes:
    message = {**envelope, **{key.replace("_", "-"): value for key, value in changes.items()}}
    return json.dumps(message).encode()


def redis_bad_messages(cluster: Cluster) -> dict[bytes, str]:
    """Malformed queue entries -> what the worker's log says about each."""
    envelope = template(cluster)
    headers = {key: value for key, value in envelope["headers"].items() if key != "id"}
    pickled = base64.b64encode(b"\x80\x04K\x01.").decode()
    no_arguments = base64.b64encode(json.dumps([[], {}, {}]).encode()).decode()
    return {
        with_changes(envelope, body=no_arguments):
            "its arguments do not fit task dspex.run_module (missing a required argument: 'execution_id')",
        b"not-json": "not JSON",
        with_changes(envelope, body="!!!not base64!!!"): "its body is not valid base64",
        json.dumps({"hello": "world"}).encode(): "not a message envelope (no properties.delivery_tag)",
        json.dumps([1, 2, 3]).encode(): "not a message envelope (a JSON list)",
        with_changes(envelope, headers="oops"): "its headers are not a mapping",
        with_changes(envelope, body=pickled, content_type="application/x-python-serialize"):
            "Refusing to deserialize untrusted content of type pickle",
        with_changes(envelope, content_type="application/x-unknown"):
            "Refusing to deserialize untrusted content of type application/x-unknown",
        with_changes(envelope, headers=headers): "Celery cannot take it in (KeyError: 'id')",
        os.urandom(HUGE_BYTES): f"({HUGE_BYTES} bytes)",
    }


def diamond(name: str) -> Any:
    """a (on worker a) -> b (on worker b) -> c (either)."""
    return program(name, {
        "a": {"uses": f"{BASIC}:add", "inputs": {"a": 1, "b": 2}, "resource": "a"},
        "b": {"uses": f"{BASIC}:inc", "inputs": {"x": "$a.sum"}, "resource": "b"},
        "c": {"uses": f"{BASIC}:inc", "inputs": {"x": "$b.x"}},
    })


def assert_serving(cluster: Cluster, workers: list[WorkerProcess], strategies: tuple[str, ...]) -> None:
    """Every worker is alive and the next executions (which need all of them) succeed."""
    for worker in workers:
        assert worker.process.poll() is None, worker.log.read_text(errors="replace")[-3000:]
    for strategy in strategies:
        result = cluster.run(diamond(f"after_bad_{strategy}"), strategy=strategy, timeout=60)
        assert result.status is ExecutionStatus.SUCCEEDED, result.modules
        assert result.outputs == {"c": {"x": 5}}


def log_of(worker: WorkerProcess) -> str:
    return worker.log.read_text(errors="replace")


def test_malformed_messages_on_every_queue_leave_every_worker_serving(cluster: Cluster) -> None:
    # Given malformed messages on each worker's own queue, the shared resource queue and the control queue
    namespace = cluster.settings.namespace
    client: redis.Redis = cluster.runtime.store.client
    bad = redis_bad_messages(cluster)
    queues = [f"{namespace}.{name}" for name in ("a", "b", "default", "control")]
    for queue in queues:
        client.lpush(queue, *bad)
    # When the workers have taken them
    wait_for(lambda: not any(client.llen(queue) for queue in queues), timeout=60, what="the queues to drain")
    worker_a, worker_b = cluster.workers
    for worker in (worker_a, worker_b):  # each had every message on its own queue
        wait_for(lambda worker=worker: all(reason in log_of(worker) for reason in bad.values()), timeout=30,
                 what=lambda worker=worker: "every drop to be logged:\n" + log_of(worker)[-3000:])
    # Then each drop was logged with its reason (and the queue), no worker stopped, and the next
    # executions (both workers, the control queue for levels) succeed
    assert f"dropped a message from queue {namespace}.control: not JSON" in log_of(worker_a) + log_of(worker_b)
    assert_serving(cluster, [worker_a, worker_b], ("levels", "dag"))
    assert "Unrecoverable error" not in log_of(worker_a) + log_of(worker_b)
    # And each drop is one line: none of Celery's multi-line reports (tracebacks, the body dumped)
    for worker in (worker_a, worker_b):
        assert "Traceback" not in log_of(worker) and "CRITICAL" not in log_of(worker), log_of(worker)[-3000:]
    # And no dropped message is left to come back after the visibility timeout
    wait_for(lambda: client.hlen(f"{namespace}.unacked") == 0, what="nothing left unacknowledged")


@pytest.mark.parametrize("strategy", ["levels", "dag"])
def test_stray_run_module_for_a_module_not_in_the_plan_changes_nothing(cluster: Cluster, strategy: str) -> None:
    # Given a strict execution with a module running
    key = f"{cluster.settings.namespace}:side:{uuid.uuid4().hex[:8]}"
    handle = cluster.submit(program(f"stray_{strategy}", {
        "slow": {"uses": f"{FAULTY}:sleeper", "inputs": {"key": key, "seconds": 2}},
        "after": {"uses": f"{BASIC}:inc", "inputs": {"x": 1}, "depends_on": ["slow"]},
    }), strategy=strategy)
    wait_for(lambda: side_channel().hget(key, "pid"), what="the slow module to start")
    # When a run_module message names a module the plan does not have
    stray = uuid.uuid4().hex
    cluster.runtime.app.send_task("dspex.run_module", args=(handle.execution_id, "ghost"), task_id=stray,
                                  queue=f"{cluster.settings.namespace}.default", ignore_result=True)
    wait_for(lambda: any(f"[{stray}] received" in log_of(worker) for worker in cluster.workers),
             what="a worker to receive the stray message")
    # Then the execution succeeds as if it had never come, and nothing was recorded for it
    result = handle.get(timeout=60, propagate=False)
    assert result.status is ExecutionStatus.SUCCEEDED and result.error is None and result.failed_modules == []
    assert set(result.modules) == {"slow", "after"}
    assert "ghost" not in cluster.runtime.store.records(handle.execution_id)
    # And the worker said why it dropped it
    warning = f"execution {handle.execution_id} has no module 'ghost'; dropping a run_module message for it"
    wait_for(lambda: any(warning in log_of(worker) for worker in cluster.workers), what="the drop to be logged")


def amqp_bad_messages() -> list[tuple[dict[str, Any], str]]:
    """Malformed AMQP messages (publish arguments) -> what the worker's log says about each."""
    task = {"task": "dspex.run_module", "id": uuid.uuid4().hex}
    json_type = {"content_type": "application/json", "content_encoding": "utf-8"}
    return [
        ({"body": b"not-json", **json_type, "headers": {}}, "Can't decode message body"),
        ({"body": b"not-json", **json_type, "headers": task}, "Can't decode message body"),
        ({"body": b"\x80\x04K\x01.", "content_type": "application/x-python-serialize", "content_encoding": "binary",
          "headers": task}, "Refusing to deserialize untrusted content of type pickle"),
        ({"body": json.dumps({"hello": "world"}).encode(), **json_type, "headers": {}},
         "Received and deleted unknown message"),
        ({"body": json.dumps([["x", "m"], {}, {}]).encode(), **json_type, "headers": {"task": "dspex.run_module"}},
         "Celery cannot take it in (KeyError: 'id')"),
        ({"body": os.urandom(HUGE_BYTES), "content_type": "application/octet-stream", "content_encoding": "binary",
          "headers": {}}, "Refusing to deserialize untrusted content of type application/octet-stream"),
    ]


def test_malformed_amqp_messages_leave_the_worker_serving(make_cluster, amqp_url: str, redis_url: str) -> None:
    # Given a worker on RabbitMQ, and malformed messages on its resource queue and the control queue
    cluster: Cluster = make_cluster(broker_url=amqp_url, result_backend=redis_url)
    worker = cluster.start_worker("default", "a", "b", concurrency=2)
    bad = amqp_bad_messages()
    with kombu.Connection(amqp_url) as connection:
        producer = connection.Producer()
        for queue in ("default", "control"):
            for publish, _ in bad:
                producer.publish(publish["body"], routing_key=f"{cluster.settings.namespace}.{queue}", exchange="",
                                 serializer=None, **{k: v for k, v in publish.items() if k != "body"})
    # When the worker has taken them, Then each was logged with its reason and the worker goes on
    wait_for(lambda: all(reason in log_of(worker) for _, reason in bad), timeout=60,
             what=lambda: "every drop to be logged:\n" + log_of(worker)[-3000:])
    assert_serving(cluster, [worker], ("levels",))
    assert "Unrecoverable error" not in log_of(worker)


def wedging_messages(cluster: Cluster, queue: str) -> list[bytes]:
    """Well-formed envelopes whose task fields make Celery raise outside the task, before the ack:
    a task id that is None, stamps that are no mapping, an errback whose task takes other arguments
    (called when the task fails: here it gets no arguments)."""
    envelope = template(cluster)
    envelope["properties"] = {**envelope["properties"], "delivery_info": {"exchange": "", "routing_key": queue}}
    envelope["headers"] = {**envelope["headers"], "argsrepr": "()"}

    def message(headers: dict[str, Any], args: list[Any], embed: dict[str, Any]) -> bytes:
        body = json.dumps([args, {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None, **embed}])
        return with_changes({**envelope, "headers": {**envelope["headers"], "id": uuid.uuid4().hex, **headers},
                             "properties": {**envelope["properties"], "delivery_tag": uuid.uuid4().hex}},
                            body=base64.b64encode(body.encode()).decode())

    errback = {"task": "dspex.compensate", "args": [], "kwargs": {}, "options": {}}
    return [message({"id": None}, ["no-such-execution", "m"], {}),
            message({"stamps": 5}, ["no-such-execution", "m"], {}),
            message({}, [], {"errbacks": [errback]}),
            message({}, [], {"errbacks": 5})]


def test_forged_task_fields_do_not_hold_worker_slots(cluster: Cluster) -> None:
    # Given, on each worker's own queue, more messages that fail outside the task than it has slots
    namespace = cluster.settings.namespace
    client: redis.Redis = cluster.runtime.store.client
    queues = [f"{namespace}.{name}" for name in ("a", "b")]
    for queue in queues:
        for _ in range(3):
            client.lpush(queue, *wedging_messages(cluster, queue))
    # When the workers have taken them
    wait_for(lambda: not any(client.llen(queue) for queue in queues), timeout=60, what="the queues to drain")
    # Then every worker still serves (both strategies need both workers) and none is left unacknowledged
    assert_serving(cluster, list(cluster.workers), ("levels", "dag"))
    wait_for(lambda: client.hlen(f"{namespace}.unacked") == 0, what="nothing left unacknowledged")
