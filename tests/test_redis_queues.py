"""``dag`` pushes ready children's task messages from a Lua step: they must be what Celery would send.

The contract is kombu's Redis message format, checked against stock Celery and kombu (no dspex
transport or consumer): the envelope the step writes equals the one a plain Celery app's
``apply_async`` sends, and a plain Celery worker runs it. A kombu or Celery upgrade that changes the
format fails here.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from dspex_celery import UnservedResourceWarning
from dspex_celery.bootstrap import create_runtime
from dspex_celery.canvas import PLAN_HEADER, RUN_MODULE, module_signature, task_id
from dspex_celery.examples import synthetic
from dspex_celery.execution import Execution
from dspex_celery.program import Program
from dspex_celery.plan import plan_digest
from dspex_celery.redis_queues import BEGIN_LEAD_KEY, LEAD_KEY, PLAN_LEAD_KEY, RedisQueues
from dspex_celery.routing import queue_name
from dspex_celery.settings import Settings
from dspex_celery.strategies.dag import CHAIN_HEADER, dag_signature
from dspex_celery.testing import WorkerProcess
from tests.conftest import ROOT, Cluster, program, wait_for
from tests.modules.stock_celery import stock_app

pytestmark = pytest.mark.integration

#: Not compared: unique per message (or per publishing thread), or (argsrepr, kwargsrepr) options that
#: apply_async also copies into the properties, where no consumer reads them (the headers carry them).
PER_MESSAGE = {"delivery_tag", "reply_to", "argsrepr", "kwargsrepr"}
#: A resource class no dspex worker serves: its queue is read by a stock Celery worker.
STOCK = "stock"


def decoded(raw: str | bytes) -> dict:
    message = json.loads(raw)
    message["body"] = json.loads(base64.b64decode(message["body"]))
    message["properties"] = {k: v for k, v in message["properties"].items() if k not in PER_MESSAGE}
    message["headers"].pop("origin")
    return message


def stock_publisher(broker_url: str, queues: RedisQueues) -> Celery:
    """A plain Celery app on the same Redis with the deployment's priority steps (a transport option)."""
    return stock_app(broker_url, RUN_MODULE, f"unused:{uuid.uuid4().hex}", list(queues.priority_steps))


@pytest.mark.parametrize("timeout_s", [None, 5.0])
def test_enqueued_message_is_the_one_apply_async_sends(redis_url: str, timeout_s: float | None) -> None:
    # Given a module signature of a plan, with and without a time limit
    runtime = create_runtime(Settings(broker_url=redis_url, namespace=f"q{uuid.uuid4().hex[:8]}"))
    data = synthetic.chain(3)
    if timeout_s:
        data["modules"]["c1"]["timeout_s"] = timeout_s
    plan = Program.from_dict(data).plan()
    signature = module_signature(runtime.app, plan, "exec1", "c1", runtime.settings.namespace)
    queues = runtime.queues
    assert queues is not None
    client = runtime.store.client
    try:
        # When a stock Celery app publishes it, and RedisQueues builds it
        stock = stock_publisher(redis_url, queues)
        stock.signature(signature.task, signature.args, signature.kwargs, **signature.options).apply_async(
            ignore_result=True)
        key, message = queues.message(signature)
        # Then it lands on the same list, with the same body, headers and properties
        assert client.llen(key) == 1
        assert decoded(message) == decoded(client.lindex(key, 0))
    finally:
        client.delete(*client.keys(f"{runtime.settings.namespace}*"))


@pytest.fixture
def stock_worker(redis_url: str, tmp_path: Path) -> Iterator[Any]:
    """Starts a stock Celery worker (``celery -A tests.modules.stock_celery worker``) on one queue;
    gives the Redis list its task records its calls in."""
    started: list[WorkerProcess] = []
    record_key = f"stock-calls:{uuid.uuid4().hex}"

    def start(queue: str, priority_steps: tuple[int, ...]) -> str:
        env = {"PYTHONPATH": str(ROOT), "STOCK_BROKER_URL": redis_url, "STOCK_TASK_NAME": RUN_MODULE,
               "STOCK_RECORD_KEY": record_key, "STOCK_PRIORITY_STEPS": ",".join(map(str, priority_steps))}
        log = tmp_path / "stock-worker.log"
        args = [sys.executable, "-m", "celery", "-A", "tests.modules.stock_celery", "worker", "-Q", queue,
                "-P", "solo", "-c", "1", "--without-mingle", "--without-gossip", "--without-heartbeat",
                "-l", "INFO", "-n", f"stock-{uuid.uuid4().hex[:6]}@%h"]
        with log.open("wb") as handle:
            process = subprocess.Popen(args, cwd=ROOT, env={**_inherited(), **env}, stdout=handle,
                                       stderr=subprocess.STDOUT)
        worker = WorkerProcess(process, log, (STOCK,))
        started.append(worker)
        worker.wait_ready()
        return record_key

    yield start
    for worker in started:
        worker.stop()


def _inherited() -> dict[str, str]:
    """The test's environment without dspex or Celery settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("DSPEX_", "CELERY_"))}


def test_a_stock_celery_worker_runs_the_message_the_dag_step_pushed(make_cluster, redis_url: str,
                                                                     stock_worker: Any) -> None:
    # Given a dspex worker for `default`, and a child module of a class only a stock Celery worker reads
    cluster: Cluster = make_cluster()
    cluster.start_worker("default", pool="threads")
    prog = program("contract", {
        "parent": {"uses": "tests.modules.basic:add", "inputs": {"a": 1, "b": 2}},
        "child": {"uses": "tests.modules.basic:add", "inputs": {"a": "$parent.sum", "b": 1}, "resource": STOCK,
                  "timeout_s": 5},
    })
    runtime, namespace = cluster.runtime, cluster.settings.namespace
    queues, client = runtime.queues, runtime.store.client
    assert queues is not None
    with pytest.warns(UnservedResourceWarning):
        handle = cluster.submit(prog, strategy="dag")
    execution_id = handle.execution_id
    try:
        plan = runtime.store.plan(execution_id)
        assert plan is not None
        digest = plan_digest(client.get(runtime.store.key(execution_id, "plan")))
        signature = dag_signature(Execution(runtime, execution_id), plan, "child", chains=True)
        # a worker of another execution may take it; one that parsed this plan's text does not read it again
        assert signature.options["headers"] == {CHAIN_HEADER: True, PLAN_HEADER: digest}
        queue = queue_name(namespace, STOCK)
        key = queues.key(queue, int(signature.options["priority"]))
        # When the parent finishes: the Lua step that stores its output pushes the child's message
        pushed = wait_for(lambda: client.lindex(key, 0), 30, "the child's message on its queue")
        # Then it is the message a stock Celery app's apply_async sends from inside the parent's task
        parent_id = task_id(execution_id, "parent")
        stock = stock_publisher(redis_url, queues)
        stock.signature(signature.task, signature.args, signature.kwargs, **signature.options).apply_async(
            ignore_result=True, root_id=parent_id, parent_id=parent_id)
        assert client.llen(key) == 2
        # ... but for its lead, first in the envelope (take-next reads it without decoding the message):
        # another execution's chain may take it, it has a time limit, and its task id; then its plan's digest
        lead = "11" + task_id(execution_id, "child")
        assert pushed.startswith(f'{{"{LEAD_KEY}": "{lead}", "{PLAN_LEAD_KEY}": "{digest}", ')
        ours = decoded(pushed)
        assert ours.pop(LEAD_KEY) == lead and ours.pop(PLAN_LEAD_KEY) == digest
        # and the begin of its first attempt as data, for a dspex worker that takes it next (its running record left out)
        spec = ours.pop(BEGIN_LEAD_KEY)
        assert spec[1][:4] == [runtime.store.key(execution_id, part) for part in ("rec", "meta", "finished", "out")]
        assert spec[2][:3] == ["child", str(runtime.store.ttl_s), ""] and spec[2][-1] == "parent"
        assert decoded(client.lpop(key)) == ours  # LPUSH: the newest is first
        # And a stock Celery worker on that queue runs the module task with its args, ids and time limits
        record_key = stock_worker(queue, queues.priority_steps)
        call = json.loads(wait_for(lambda: client.lpop(record_key), 30, "the stock worker's call"))
        assert call == {
            "args": [execution_id, "child"],
            "kwargs": {"program": "contract"},
            "id": task_id(execution_id, "child"),
            "root_id": parent_id,
            "parent_id": parent_id,
            "timelimit": [signature.options["time_limit"], 5.0],
            "delivery_info": {"exchange": "", "routing_key": queue},
        }
        assert client.llen(key) == 0
    finally:
        handle.cancel()


def test_atomic_enqueue_only_where_a_store_script_reaches_the_queues(redis_url: str) -> None:
    other_db = redis_url.rsplit("/", 1)[0] + "/15"
    enabled = [
        Settings(broker_url=redis_url),
        Settings(broker_url=redis_url, result_backend=redis_url),
    ]
    disabled = [
        Settings(broker_url=redis_url, result_backend=other_db),  # queues in another database
        Settings(broker_url=redis_url, sent_events=True),  # task-sent events come from Celery's publish
        Settings(broker_url="amqp://guest:guest@127.0.0.1:5672//", result_backend=redis_url),
        Settings(),  # embedded
    ]
    assert all(isinstance(RedisQueues.of(s, create_runtime(s).app), RedisQueues) for s in enabled)
    assert all(RedisQueues.of(s, create_runtime(s).app) is None for s in disabled)
