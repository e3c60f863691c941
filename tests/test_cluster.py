"""The distributed path: real `dspex-celery worker` subprocesses against real Redis (and RabbitMQ)."""

from __future__ import annotations

import json
import time
import warnings

import pytest

from dspex_celery import (
    ExecutionStatus,
    Program,
    Settings,
    UnservedResourceWarning,
    create_runtime,
    submit_batch,
    submit_program,
)
from dspex_celery.examples import synthetic
from dspex_celery.examples.rag import retrieve
from tests.conftest import Cluster, program
from tests.modules.basic import DIAMOND

pytestmark = pytest.mark.integration

@pytest.fixture(scope="module")
def cluster(make_cluster) -> Cluster:
    """Two workers: one for `io` + `default`, one for `llm`."""
    cluster = make_cluster()
    cluster.start_worker("io", "default", concurrency=4)
    cluster.start_worker("llm", concurrency=4, pool="threads")
    return cluster


def test_diamond_outputs_and_routing(cluster: Cluster) -> None:
    # When the diamond runs on the cluster
    result = cluster.run(Program.from_dict(DIAMOND), {"x": 4})
    # Then outputs are right: top = 5, left = 10, right = 15, bottom = 25
    assert result.status is ExecutionStatus.SUCCEEDED
    assert result.outputs == {"result": 25, "top": {"sum": 5}}
    # And each module ran on the worker serving its resource class
    io_worker, llm_worker = cluster.workers
    assert result.modules["top"].worker.startswith(io_worker.name + "@")
    assert result.modules["right"].worker.startswith(io_worker.name + "@")  # "default"
    assert result.modules["left"].worker.startswith(llm_worker.name + "@")
    assert result.modules["bottom"].worker.startswith(llm_worker.name + "@")
    assert io_worker.name != llm_worker.name


def test_workers_keep_their_start_up_heap_out_of_full_collections(cluster: Cluster) -> None:
    # Given a module on the prefork worker and one on the thread-pool worker
    state = "tests.modules.ops_mods:gc_state"
    prog = program("gc_state", {"p": {"uses": state, "resource": "io"}, "t": {"uses": state, "resource": "llm"}})
    # When they run
    result = cluster.run(prog)
    # Then both pool kinds run with their start-up heap frozen (a full collection of it holds the GIL ~0.1 s
    # with DSPy loaded) and the collector still on for what tasks make
    assert result.status is ExecutionStatus.SUCCEEDED
    for name in "pt":
        assert result.outputs[name]["frozen"] > 10_000 and result.outputs[name]["enabled"], result.outputs


def test_both_strategies_identical(cluster: Cluster) -> None:
    data = synthetic.random_dag(60, seed=11)
    levels = cluster.run(Program.from_dict(data), strategy="levels")
    sequential = cluster.run(Program.from_dict(data), strategy="sequential")
    expected = synthetic.expected_values(data)
    assert levels.outputs == sequential.outputs
    assert levels.outputs == {name: {"value": expected[name]} for name in levels.outputs}
    assert levels.strategy == "levels" and sequential.strategy == "sequential"


def test_300_module_layered_program(cluster: Cluster) -> None:
    data = synthetic.layered(depth=60, width=5)
    result = cluster.run(Program.from_dict(data), timeout=240)
    expected = synthetic.expected_values(data)
    assert result.status is ExecutionStatus.SUCCEEDED
    assert len(result.modules) == 300
    assert all(record.status.value == "succeeded" for record in result.modules.values())
    assert result.outputs == {name: {"value": expected[name]} for name in result.outputs}
    assert len(result.outputs) == 5


def test_100_wide_fan_out(cluster: Cluster) -> None:
    data = synthetic.fan_out(100)
    result = cluster.run(Program.from_dict(data), timeout=120)
    assert result.outputs == {"total": 1 + 100 * 2}
    workers = {record.worker.split("@")[0] for record in result.modules.values()}
    assert workers == {cluster.workers[0].name}  # every module is `default`: only that worker serves it


def test_embedded_equals_cluster(cluster: Cluster) -> None:
    data = synthetic.random_dag(30, seed=3)
    embedded = create_runtime(Settings(namespace="embedded-vs-cluster")).app
    local = submit_program(Program.from_dict(data), {}, app=embedded).get(timeout=60, propagate=False)
    remote = cluster.run(Program.from_dict(data))
    assert local.outputs == remote.outputs and local.status == remote.status


def test_cli_run_against_cluster(cluster: Cluster) -> None:
    question = "Which in-memory data store do people use?"
    result = cluster.cli("run", "examples/rag.yaml", "-i", f"question={question}", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["outputs"]["sources"] == retrieve(question)["ids"] and data["outputs"]["sources"][0] == "redis"
    assert data["modules"]["retrieve"]["worker"].startswith(cluster.workers[0].name + "@")


def test_module_outside_allow_list_is_refused(cluster: Cluster) -> None:
    # Given a module from a package the workers do not allow (json is importable everywhere)
    prog = program("forbidden", {"dump": {"uses": "json:dumps", "inputs": {"obj": 1}}})
    result = cluster.run(prog)
    # Then the module fails with a clear "not allowed" error and nothing is called
    assert result.status is ExecutionStatus.FAILED
    error = result.modules["dump"].error
    assert "'json:dumps' is not allowed on this worker" in error and "--modules json" in error


def test_messages_do_not_grow_with_program_size(cluster: Cluster) -> None:
    # The plan is in the state store; a task message carries only (execution id, module)
    runtime = cluster.runtime
    from dspex_celery.canvas import module_signature

    small = Program.from_dict(synthetic.layered(2, 2)).plan()
    large = Program.from_dict(synthetic.layered(200, 5)).plan()
    size = lambda plan: len(json.dumps(module_signature(runtime.app, plan, "x" * 32, "m1_1", "ns")))  # noqa: E731
    assert size(small) == size(large)


def test_rabbitmq_broker(make_cluster, amqp_url: str, redis_url: str) -> None:
    # Given a cluster on RabbitMQ with Redis as result backend
    cluster = make_cluster(broker_url=amqp_url, result_backend=redis_url)
    cluster.start_worker("io", "llm", "default", concurrency=2)
    # Then the diamond gives the same outputs
    result = cluster.run(Program.from_dict(DIAMOND), {"x": 4})
    assert result.outputs == {"result": 25, "top": {"sum": 5}}


def test_pickle_messages_are_refused(cluster: Cluster) -> None:
    # Given a pickled message sent to a worker's queue
    from dspex_celery.routing import queue_name

    runtime = cluster.runtime
    queue = queue_name(runtime.settings.namespace, "default")
    runtime.app.send_task("dspex.run_module", args=("pickled-exec", "m"), serializer="pickle", queue=queue)
    # Then the worker refuses to deserialize it and runs nothing
    worker = cluster.workers[0]
    deadline = time.monotonic() + 20
    while "Refusing to deserialize untrusted content of type pickle" not in worker.log.read_text():
        assert time.monotonic() < deadline, worker.log.read_text()[-2000:]
        time.sleep(0.1)
    assert runtime.store.records("pickled-exec") == {}


def test_run_warns_at_once_when_no_worker_serves_a_resource_class(make_cluster, tmp_path) -> None:
    # Given one live worker, for the default resource class only
    cluster: Cluster = make_cluster()
    worker = cluster.start_worker("default", pool="threads")
    workers = json.loads(cluster.cli("status", "--json").stdout)["workers"]
    assert list(workers.values()) == [["default"]]
    served = tmp_path / "served.json"
    served.write_text(json.dumps({"name": "served", "modules": {
        "a": {"uses": "tests.modules.basic:add", "inputs": {"a": 1, "b": 2}}}}))
    waiting = tmp_path / "waiting.json"
    waiting.write_text(json.dumps({"name": "waiting", "modules": {
        "a": {"uses": "tests.modules.basic:add", "inputs": {"a": 1, "b": 2}},
        "b": {"uses": "tests.modules.basic:add", "inputs": {"a": "$a.sum", "b": 1}, "resource": "llm"}}}))
    # When a program needs a class no worker serves, it says so before it waits
    result = cluster.cli("run", str(waiting), "--timeout", "3")
    assert result.returncode == 1
    assert ("warning: no live worker serves resource class 'llm' (modules b): those modules wait in their "
            "queue until one starts (dspex-celery worker --resource llm)") in result.stderr
    # as a batch too
    lines = tmp_path / "lines.jsonl"
    lines.write_text("{}\n")
    result = cluster.cli("run", str(waiting), "--inputs-file", str(lines), "--timeout", "3", "-q")
    assert result.returncode == 1 and "warning: no live worker serves resource class 'llm'" in result.stderr
    # and a program whose classes are all served runs without a warning
    result = cluster.cli("run", str(served))
    assert result.returncode == 0 and "warning" not in result.stderr
    # From Python, submit_program and submit_batch warn with an UnservedResourceWarning
    with pytest.warns(UnservedResourceWarning, match=r"resource class 'llm' \(modules b\)"):
        handle = cluster.submit(Program.from_file(waiting))
    handle.cancel()
    with pytest.warns(UnservedResourceWarning, match="'llm'"):
        submit_batch(Program.from_file(waiting), [{}], app=cluster.runtime.app)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnservedResourceWarning)
        assert cluster.run(Program.from_file(served)).succeeded
    # Then a worker that shut down no longer counts
    worker.stop()
    assert json.loads(cluster.cli("status", "--json").stdout)["workers"] == {}
