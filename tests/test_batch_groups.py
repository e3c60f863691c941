"""Batch throughput on real workers: lines started together in one transaction, one result stream."""

from __future__ import annotations

import time

import pytest

from dspex_celery import Program, submit_batch
from dspex_celery.client import launch_together, new_execution_id
from dspex_celery.result_stream import ResultStream
from tests.conftest import Cluster
from tests.modules.dspy_mods import rag_program

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(make_cluster) -> Cluster:
    cluster = make_cluster()
    cluster.start_worker("default", concurrency=4, pool="threads")
    return cluster


def question(index: int) -> dict[str, str]:
    return {"question": f"line {index}: what is redis?"}


def test_started_together_under_dag_and_each_result_streamed_once(cluster: Cluster) -> None:
    runtime = cluster.runtime
    plan = Program.from_dict(rag_program("together")).plan()
    inputs = {new_execution_id(): question(index) for index in range(6)}
    ids = list(inputs)
    # A strategy that cannot start them in one transaction stores nothing (the caller launches each)
    assert not launch_together(runtime, plan, {ids[0]: inputs[ids[0]]}, "levels", None)
    assert not runtime.store.exists(ids[0])
    # When six executions are started together under dag
    assert launch_together(runtime, plan, inputs, "dag", None)
    assert all(runtime.store.meta(execution_id)["started"] for execution_id in ids)
    # Then a stream waiting for half of them gets their results as they are published ...
    stream = ResultStream(runtime)
    for execution_id in ids[:3]:
        stream.add(execution_id)
    results = take_all(stream, 3)
    # ... and the results of executions added once they had already finished, each once
    deadline = time.monotonic() + 60
    while not all(runtime.store.is_finished(execution_id) for execution_id in ids) and time.monotonic() < deadline:
        time.sleep(0.05)
    for execution_id in ids[3:]:
        stream.add(execution_id)
    results += take_all(stream, 3)
    stream.close()
    assert sorted(execution_id for execution_id, _ in results) == sorted(ids)
    for execution_id, meta in results:
        assert meta["result"]["status"] == "succeeded"
        assert meta["result"]["outputs"]["query"] == inputs[execution_id]["question"]


def take_all(stream: ResultStream, count: int) -> list[tuple[str, dict]]:
    found: list[tuple[str, dict]] = []
    deadline = time.monotonic() + 60
    while len(found) < count and time.monotonic() < deadline:
        found += stream.take(0.2)
    assert stream.take(0) == [] and len(found) == count
    return found


def test_a_chain_batch_runs_as_dag_in_input_order(cluster: Cluster) -> None:
    # When a chain (retrieve -> generate) runs as a batch without --strategy
    lines = [question(index) for index in range(20)]
    result = submit_batch(Program.from_dict(rag_program("chain")), lines, app=cluster.runtime.app,
                          max_in_flight=8).get()
    # Then every line succeeded with its own outputs, each one executed under dag
    assert [line.outputs["query"] for line in result.lines if line.outputs] == [line["question"] for line in lines]
    assert {cluster.runtime.store.meta(line.execution_id or "")["strategy"] for line in result.lines} == {"dag"}
