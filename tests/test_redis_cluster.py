"""A 3-master Redis Cluster as the state store (and Celery's result backend), with the suite's plain
Redis as the broker: the integration programs on real workers, each script within one slot."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from dspex_celery import ExecutionStatus, Program
from dspex_celery.breaker import circuits, reset_circuit
from dspex_celery.cli import cli
from dspex_celery.examples import synthetic
from dspex_celery.resources import lease_keys, wake_key
from dspex_celery.results import ExecutionResult, ModuleRecord, parse_time
from dspex_celery.testing import RedisClusterServers
from tests.conftest import Cluster, program, unavailable
from tests.modules import dag_mods
from tests.modules.basic import DIAMOND
from tests.modules.faulty import side_channel

pytestmark = pytest.mark.integration

LIMITS = {"llm": {"max_concurrent": 2}}
LIMITS_ENV = {"DSPEX_RESOURCES": json.dumps(LIMITS)}
COUNTED = "tests.modules.dag_mods:counted"
HOLD = "tests.modules.ops_mods:hold"


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        unavailable("redis-server and redis-cli", "not installed")
    cluster = RedisClusterServers(tmp_path_factory.mktemp("redis-cluster")).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def cluster(servers: RedisClusterServers, make_cluster: Any) -> Cluster:
    """Two worker processes on a plain Redis broker, their state in the Redis Cluster (``servers`` first:
    the cluster is torn down after the workers)."""
    cluster = make_cluster(result_backend=servers.url(), resources=LIMITS)
    cluster.start_worker("default", "io", "llm", concurrency=4, pool="threads", env=LIMITS_ENV, wait=False)
    cluster.start_worker("default", "llm", concurrency=4, pool="threads", env=LIMITS_ENV, wait=False)
    for worker in cluster.workers:  # started together, so they boot in parallel
        worker.wait_ready()
    return cluster


def slots_of(cluster: Cluster, keys: list[str]) -> set[int]:
    client = cluster.runtime.store.client
    return {client.keyslot(key) for key in keys}


@pytest.mark.parametrize("strategy", ["dag", "levels"])
def test_diamond_on_a_redis_cluster_keeps_an_execution_in_one_slot(cluster: Cluster, strategy: str) -> None:
    # Given a Redis Cluster state store (and result backend)
    store = cluster.runtime.store
    assert store.clustered
    # When the diamond runs (levels: Celery chords, their keys under the group's hash tag)
    result = cluster.run(Program.from_dict(DIAMOND), {"x": 4}, strategy=strategy, timeout=60)
    # Then its outputs are right, and every key of the execution is in one slot of the cluster
    assert result.status is ExecutionStatus.SUCCEEDED, result.error
    assert result.outputs == {"result": 25, "top": {"sum": 5}}
    keys = list(store.client.scan_iter(match=store.key(result.execution_id, "*"), count=1000))
    assert {store.execution_of(key) for key in keys} == {result.execution_id}
    assert {"plan", "meta", "out", "rec", "finished"} <= {key.rsplit(":", 1)[1] for key in keys}
    assert len(slots_of(cluster, keys)) == 1
    # And the nodes share the executions: their slots are spread over all three masters
    node_ports = {store.client.get_node_from_key(store.key(uuid.uuid4().hex, "plan")).port for _ in range(60)}
    assert len(node_ports) == 3


def test_300_module_layered_program_on_a_redis_cluster(cluster: Cluster) -> None:
    data = synthetic.layered(30, 10)
    result = cluster.run(Program.from_dict(data), strategy="dag", timeout=120)
    assert result.status is ExecutionStatus.SUCCEEDED, result.error
    expected = synthetic.expected_values(data)
    assert result.outputs == {name: {"value": expected[name]} for name in result.outputs}
    assert len(result.outputs) == 10
    assert all(record.attempts == 1 for record in result.modules.values())


def race_program(diamonds: int, token: str) -> Program:
    """Diamonds whose two parents take the same time, so the dag counts of the join race."""
    modules: dict[str, Any] = {}
    for i in range(diamonds):
        modules[f"top{i}"] = {"uses": COUNTED, "inputs": {"key": f"{token}:top{i}"}}
        for side in ("l", "r"):
            modules[f"{side}{i}"] = {"uses": COUNTED, "inputs": {"key": f"{token}:{side}{i}", "ms": 5, "x": f"$top{i}.value"}}
        modules[f"join{i}"] = {"uses": COUNTED, "inputs": {"key": f"{token}:join{i}", "a": f"$l{i}.value", "b": f"$r{i}.value"}}
    return Program.from_dict({"name": "race", "modules": modules})


def test_dag_parent_race_on_a_redis_cluster_never_double_runs_or_loses_a_join(cluster: Cluster) -> None:
    token = uuid.uuid4().hex
    with ThreadPoolExecutor(3) as pool:
        handles = list(pool.map(lambda n: cluster.submit(race_program(12, f"{token}-{n}"), strategy="dag"), range(3)))
    for n, handle in enumerate(handles):
        result = handle.get(timeout=90)
        assert result.status is ExecutionStatus.SUCCEEDED
        for i in range(12):
            assert result.outputs[f"join{i}"] == {"value": 5}  # 1 + (2 + 2)
            assert [dag_mods.calls(f"{token}-{n}:{module}{i}") for module in ("top", "l", "r", "join")] == [1] * 4
    # And Celery's result backend reads the results of executions in different slots at once (batch does)
    ids = [handle.execution_id for handle in handles]
    assert len(slots_of(cluster, [cluster.runtime.store.key(execution_id, "plan") for execution_id in ids])) > 1
    found = dict(cluster.runtime.app.backend.get_many(ids, interval=0, max_iterations=1))
    assert set(found) == set(ids) and all(meta["status"] == "SUCCESS" for meta in found.values())


def call(name: str, key: str) -> Program:
    return program(name, {"call": {
        "uses": "tests.modules.faulty:dependency", "inputs": {"key": key},
        "circuit_breaker": {"failures": 3, "reset_s": 120}, "retry": {"max_attempts": 1},
    }})


def test_breaker_on_a_redis_cluster_opens_fails_fast_and_resets(cluster: Cluster) -> None:
    name, key = f"brk_{uuid.uuid4().hex[:6]}", f"{cluster.settings.namespace}:side:{uuid.uuid4().hex[:8]}"
    side_channel().set(f"{key}:down", 1, ex=600)
    store = cluster.runtime.store
    # Given three failed calls
    runs = [cluster.run(call(name, key)) for _ in range(3)]
    assert [run.modules["call"].error for run in runs] == ["ValueError: dependency is down"] * 3
    # Then the circuit (a key on some node of the cluster) is open: the next attempt fails fast
    fast = cluster.run(call(name, key))
    assert (fast.modules["call"].error or "").startswith(f"CircuitOpen: circuit '{name}.call' is open")
    assert int(side_channel().hget(key, "calls") or 0) == 3
    shown = next(found for found in circuits(store) if found["name"] == f"{name}.call")
    assert shown["state"] == "open" and shown["failures"] == 3
    # When it is reset and the dependency is back, the module is called again
    reset_circuit(store, f"{name}.call")
    side_channel().delete(f"{key}:down")
    assert cluster.run(call(name, key)).status is ExecutionStatus.SUCCEEDED


def max_overlap(records: list[ModuleRecord]) -> int:
    events = sorted([(parse_time(r.started_at), 1) for r in records] + [(parse_time(r.finished_at), -1) for r in records])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def test_resource_limit_on_a_redis_cluster_holds_across_workers(cluster: Cluster) -> None:
    # Given 6 parallel `llm` modules, 8 worker slots in two workers, and llm: {max_concurrent: 2}
    modules = {f"m{i}": {"uses": HOLD, "inputs": {"seconds": 0.3}, "resource": "llm"} for i in range(6)}
    result: ExecutionResult = cluster.run(program("limited", modules), timeout=60)
    assert result.status is ExecutionStatus.SUCCEEDED
    records = list(result.modules.values())
    # Then never more than 2 ran at once, on both workers; the class's keys share one slot
    assert max_overlap(records) == 2
    assert len({record.worker for record in records}) == 2
    store = cluster.runtime.store
    assert len(slots_of(cluster, [*lease_keys(store, "llm"), wake_key(store, "llm")])) == 1


def test_cli_runs_and_reports_on_a_redis_cluster(cluster: Cluster, tmp_path: Path) -> None:
    # Given DSPEX_RESULT_BACKEND=redis-cluster://... (the cluster's env)
    program_file = tmp_path / "diamond.json"
    program_file.write_text(json.dumps(DIAMOND))
    # When `run` runs the diamond (the command's code in this process: no interpreter start-up)
    run = CliRunner().invoke(cli, ["run", str(program_file), "-i", "x=4", "--json"], env=cluster.env())
    # Then it prints the result
    assert run.exit_code == 0, run.output
    assert json.loads(run.stdout)["outputs"] == {"result": 25, "top": {"sum": 5}}
    # And status and resources read the cluster: both workers, the llm class and its limit
    status = CliRunner().invoke(cli, ["status", "--json"], env=cluster.env())
    assert status.exit_code == 0, status.output
    assert len(json.loads(status.stdout)["workers"]) == 2
    resources = CliRunner().invoke(cli, ["resources", "--json"], env=cluster.env(**LIMITS_ENV))
    llm = next(entry for entry in json.loads(resources.stdout)["resources"] if entry["resource"] == "llm")
    assert llm["max_concurrent"] == 2
