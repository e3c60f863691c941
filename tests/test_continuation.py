"""Worker-local continuation (dag): a worker runs a ready child of the module it just finished in
the same slot, without the broker; the child stays durable, visible in records and within its
resource class."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from dspex_celery import ExecutionStatus
from dspex_celery.canvas import task_id
from dspex_celery.continuation import TAG_PREFIX, UnackedKeys
from dspex_celery.examples import synthetic
from dspex_celery.execution import Execution
from dspex_celery.redis_queues import BEGIN_LEAD_KEY, LEAD_KEY
from dspex_celery.results import ExecutionResult, parse_time
from dspex_celery.strategies.dag import INLINE_MESSAGES, _begin_spec
from tests.conftest import Cluster, program, wait_for

pytestmark = pytest.mark.integration

STEP = "tests.modules.continuation_mods:step"
ANNOUNCED = "tests.modules.continuation_mods:announced"


@pytest.fixture(scope="module")
def cluster(make_cluster) -> Cluster:
    cluster = make_cluster()
    cluster.start_worker("default", concurrency=4, pool="threads", extra_args=("-E",))  # task events (Flower)
    return cluster


@contextmanager
def task_events(cluster: Cluster) -> Iterator[list[dict[str, Any]]]:
    """The task events the workers send meanwhile (what Flower reads)."""
    app, events = cluster.runtime.app, []
    with app.connection_for_read() as connection:
        receiver = app.events.Receiver(connection, handlers={"*": events.append})
        thread = threading.Thread(target=receiver.capture, kwargs={"limit": None, "timeout": None, "wakeup": False},
                                  daemon=True)
        thread.start()
        time.sleep(0.5)  # subscribed
        try:
            yield events
        finally:
            receiver.should_stop = True
            thread.join(timeout=5)


@pytest.fixture(scope="module")
def plain(make_cluster) -> Cluster:
    """A worker that never continues: every child goes through the broker."""
    cluster = make_cluster()
    cluster.start_worker("default", concurrency=4, pool="threads", env={"DSPEX_DAG_CONTINUATION": "0"})
    return cluster


def as_steps(data: dict[str, Any]) -> dict[str, Any]:
    """A synthetic program whose modules are ``step``s (their outputs name the task that ran them)."""
    return {**data, "modules": {name: {**module, "uses": STEP} for name, module in data["modules"].items()}}


def outputs(cluster: Cluster, result: ExecutionResult) -> dict[str, dict[str, Any]]:
    """Every module's stored output (the result keeps only the final ones)."""
    return cluster.runtime.store.outputs(result.execution_id, result.modules)


def continued(cluster: Cluster, result: ExecutionResult) -> list[str]:
    """The modules run inside another module's task (continued by their worker)."""
    return sorted(name for name, output in outputs(cluster, result).items()
                  if output["task"] != task_id(result.execution_id, name))


def values(cluster: Cluster, result: ExecutionResult) -> dict[str, int]:
    return {name: output["value"] for name, output in outputs(cluster, result).items()}


SHAPES = {
    "diamond": {"name": "diamond", "modules": {
        "top": {"uses": STEP}, "left": {"uses": STEP, "inputs": {"a": "$top.value"}},
        "right": {"uses": STEP, "inputs": {"a": "$top.value"}},
        "join": {"uses": STEP, "inputs": {"l": "$left.value", "r": "$right.value"}}}},
    "fan_out": as_steps(synthetic.layered(2, 12, name="fan")),
    "deep": as_steps(synthetic.layered(25, 1, name="deep")),
    "random": as_steps(synthetic.random_dag(60, seed=7, name="random")),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_continuation_gives_the_same_outputs_as_plain_dag(plain: Cluster, cluster: Cluster, shape: str) -> None:
    # Given the same program on a worker that continues children and on one that never does
    data = SHAPES[shape]
    # When both run it
    expected = plain.run(program(data["name"], data["modules"]), strategy="dag")
    result = cluster.run(program(data["name"], data["modules"]), strategy="dag")
    # Then every output is the same, and only the continuing worker ran modules inside another's task
    assert result.status is expected.status is ExecutionStatus.SUCCEEDED
    assert values(cluster, result) == values(plain, expected)
    assert continued(plain, expected) == []
    assert continued(cluster, result)


def test_a_continued_module_has_its_own_record(cluster: Cluster) -> None:
    # Given a chain a -> b -> c
    data = as_steps(synthetic.layered(3, 1, name="chain"))
    data["modules"]["m0_0"]["inputs"] = {"ms": 50}
    # When it runs
    with task_events(cluster) as events:
        result = cluster.run(program("chain", data["modules"]), strategy="dag")
        continued_ids = {task_id(result.execution_id, name) for name in ("m1_0", "m2_0")}
        wait_for(lambda: {e["uuid"] for e in events if e["type"] == "task-succeeded"} >= continued_ids,
                 timeout=10, what="the continued modules' task events")
    # Then Flower hears of each continued module as of a task of its own
    received = {e["uuid"]: e for e in events if e["type"] == "task-received"}
    for name in ("m1_0", "m2_0"):
        event = received[task_id(result.execution_id, name)]
        assert event["name"] == f"dspex.module:chain.{name}" and result.execution_id in event["args"]
        assert event["hostname"] == result.modules[name].worker
    # And b and c ran inside a's task, each with its own worker, start and finish, one after another
    assert result.status is ExecutionStatus.SUCCEEDED
    assert continued(cluster, result) == ["m1_0", "m2_0"]
    records = [result.modules[name] for name in ("m0_0", "m1_0", "m2_0")]
    assert all(record.worker and record.worker == records[0].worker for record in records)
    for before, after in zip(records, records[1:], strict=False):
        assert parse_time(before.finished_at) <= parse_time(after.started_at) <= parse_time(after.finished_at)
    # and no lease is left for the broker to re-deliver (the last one is released just after the result)
    unacked = UnackedKeys.of(cluster.runtime.app)
    wait_for(lambda: not [tag for tag in cluster.runtime.store.client.hkeys(unacked.messages)
                          if result.execution_id in tag], timeout=5, what="the leases to be released")


def test_continuation_respects_resource_classes(make_cluster) -> None:
    # Given an io-only worker and an llm-only worker, and an llm child of an io module
    cluster = make_cluster()
    io = cluster.start_worker("io", concurrency=2, pool="threads")
    llm = cluster.start_worker("llm", concurrency=2, pool="threads")
    modules = {"fetch": {"uses": STEP, "resource": "io"},
               "ask": {"uses": STEP, "resource": "llm", "inputs": {"a": "$fetch.value"}},
               "store": {"uses": STEP, "resource": "llm", "inputs": {"a": "$ask.value"}}}
    # When it runs
    result = cluster.run(program("classes", modules), strategy="dag")
    # Then the llm child went through the broker to the llm worker, which continued its own llm child
    assert result.status is ExecutionStatus.SUCCEEDED
    assert result.modules["fetch"].worker.startswith(io.name)
    assert result.modules["ask"].worker.startswith(llm.name)
    assert continued(cluster, result) == ["store"]
    cluster.stop()


def kill_once_started(cluster: Cluster, doomed: Any, key: str) -> list[str]:
    """Once the announced module has started (it pushes its task id on ``key``), kill -9 the ``doomed``
    worker (a threads-pool worker is one process) and start another; returns the task ids pushed."""
    started = wait_for(lambda: cluster.runtime.store.client.lrange(key, 0, -1), timeout=30,
                       what="the slow module to start")
    os.kill(doomed.process.pid, signal.SIGKILL)
    doomed.process.wait(timeout=10)
    cluster.start_worker("default", concurrency=2, pool="threads", env={"DSPEX_VISIBILITY_TIMEOUT_S": "3"})
    return started


def test_worker_killed_during_a_continued_module_the_execution_completes(make_cluster) -> None:
    # Given a worker (short visibility timeout) running a chain whose second module is slow
    cluster = make_cluster(visibility_timeout_s=3)
    doomed = cluster.start_worker("default", concurrency=1, pool="threads", env={"DSPEX_VISIBILITY_TIMEOUT_S": "3"})
    key = f"{cluster.settings.namespace}:side:{uuid.uuid4().hex[:8]}"
    modules = {"first": {"uses": STEP},
               "slow": {"uses": ANNOUNCED, "inputs": {"key": key, "ms": 2500, "a": "$first.value"}},
               "last": {"uses": STEP, "inputs": {"a": "$slow.value"}}}
    handle = cluster.submit(program("killed", modules), strategy="dag")
    # When it is killed (-9, the whole worker) while it runs the continued module, and another starts
    started = kill_once_started(cluster, doomed, key)
    assert started == [task_id(handle.execution_id, "first")]  # it was continued, inside first's task
    # Then the execution completes, every output present, the slow module run again elsewhere
    result = handle.get(timeout=60, propagate=False)
    assert result.status is ExecutionStatus.SUCCEEDED, result.error
    assert set(outputs(cluster, result)) == {"first", "slow", "last"}
    assert result.modules["slow"].lost_attempts == 1
    assert not result.modules["slow"].worker.startswith(doomed.name)
    cluster.stop()


def test_independent_modules_go_on_in_the_slot_that_freed(cluster: Cluster) -> None:
    # Given twelve modules without dependencies (all queued at the start, none made ready by another)
    modules = {f"m{index:02d}": {"uses": STEP, "inputs": {"ms": 20}} for index in range(12)}
    # When they run on a worker of four slots
    result = cluster.run(program("bag", modules), strategy="dag")
    # Then most ran inside another module's task: the slot that freed took the next queued one itself,
    # each with its own record, and no lease is left behind
    assert result.status is ExecutionStatus.SUCCEEDED
    assert values(cluster, result) == dict.fromkeys(modules, 1)
    assert len(continued(cluster, result)) >= 6
    assert all(record.worker and record.started_at for record in result.modules.values())
    unacked = UnackedKeys.of(cluster.runtime.app)
    wait_for(lambda: not [tag for tag in cluster.runtime.store.client.hkeys(unacked.messages)
                          if result.execution_id in tag], timeout=5, what="the leases to be released")


def tasks_of(cluster: Cluster, result: ExecutionResult) -> set[str]:
    """The ids of the Celery tasks its modules ran in."""
    return {output["task"] for output in outputs(cluster, result).values()}


def test_a_slot_goes_on_with_the_next_executions_queued_module(make_cluster) -> None:
    # Given one slot and two executions of independent modules queued one after the other (a batch's lines)
    cluster = make_cluster()
    cluster.start_worker("default", concurrency=1, pool="threads")
    modules = {f"m{index}": {"uses": STEP, "inputs": {"ms": 50}} for index in range(3)}
    first, second = (cluster.submit(program(f"line{n}", modules), strategy="dag") for n in range(2))
    # When both run
    results = [handle.get(timeout=60, propagate=False) for handle in (first, second)]
    # Then the first execution's chain went on with the second's modules, each with its own record
    assert [result.status for result in results] == [ExecutionStatus.SUCCEEDED] * 2
    assert any(task.startswith(first.execution_id + ".") for task in tasks_of(cluster, results[1]))
    for name, record in results[1].modules.items():
        assert record.status.value == "succeeded" and record.worker and record.started_at, name
    unacked = UnackedKeys.of(cluster.runtime.app)
    wait_for(lambda: not cluster.runtime.store.client.hlen(unacked.messages), timeout=5,
             what="every lease and message to be acked")
    assert not cluster.runtime.store.client.keys(f"{cluster.settings.namespace}:chain:*")  # nor a chain's note
    cluster.stop()


def test_a_slot_never_takes_a_module_that_must_run_in_its_own_task(make_cluster) -> None:
    # Given one slot busy with a dag execution, and queued behind it a `levels` execution (its chords
    # count task results) and a dag execution whose plan has a backup (a winning backup revokes a task)
    cluster = make_cluster()
    cluster.start_worker("default", concurrency=1, pool="threads")
    busy = {f"m{index}": {"uses": STEP, "inputs": {"ms": 100}} for index in range(3)}
    levels = {"a": {"uses": STEP}, "b": {"uses": STEP, "inputs": {"p": "$a.value"}}}
    backed = {"x": {"uses": STEP, "backup_after_s": 30}, "y": {"uses": STEP}}
    handles = [cluster.submit(program("busy", busy), strategy="dag"),
               cluster.submit(program("staged", levels), strategy="levels"),
               cluster.submit(program("backed", backed), strategy="dag")]
    # When all run
    results = [handle.get(timeout=60, propagate=False) for handle in handles]
    # Then the last two ran every module in tasks of their own execution
    assert [result.status for result in results] == [ExecutionStatus.SUCCEEDED] * 3
    for result in results[1:]:
        assert all(task.startswith(result.execution_id + ".") for task in tasks_of(cluster, result)), result.program
    cluster.stop()


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_a_warm_shutdown_ends_the_running_module_and_takes_no_more(make_cluster, pool: str) -> None:
    # Given a one-slot worker running the first of three independent slow modules
    cluster = make_cluster()
    stopping = cluster.start_worker("default", concurrency=1, pool=pool)
    key = f"{cluster.settings.namespace}:side:{uuid.uuid4().hex[:8]}"
    modules = {f"m{index}": {"uses": ANNOUNCED, "inputs": {"key": key, "ms": 1500}} for index in range(3)}
    handle = cluster.submit(program("warm-stop", modules), strategy="dag")
    wait_for(lambda: cluster.runtime.store.client.llen(key), timeout=30, what="the first module to start")
    # When it is asked to stop (SIGTERM: Celery's warm shutdown)
    os.kill(stopping.process.pid, signal.SIGTERM)
    stopping.process.wait(timeout=30)
    # Then it finished that module only: the other two stayed queued, and another worker runs them
    assert cluster.runtime.store.client.llen(key) == 1
    cluster.start_worker("default", concurrency=2, pool="threads")
    result = handle.get(timeout=60, propagate=False)
    assert result.status is ExecutionStatus.SUCCEEDED, result.error
    assert all(record.lost_attempts == 0 for record in result.modules.values())
    cluster.stop()


@pytest.mark.parametrize("lose_it", [False, True], ids=["stored", "stored-message-lost"])
def test_a_child_of_several_parents_waits_with_its_message_stored_once(make_cluster, lose_it: bool) -> None:
    # Given a child of three parents, one of them slow, on a worker that chains
    cluster = make_cluster()
    cluster.start_worker("default", concurrency=3, pool="threads")
    key = f"{cluster.settings.namespace}:side:{uuid.uuid4().hex[:8]}"
    modules = {"fast1": {"uses": STEP}, "fast2": {"uses": STEP},
               "slow": {"uses": ANNOUNCED, "inputs": {"key": key, "ms": 1500}},
               "child": {"uses": STEP, "inputs": {"a": "$fast1.value", "b": "$fast2.value", "c": "$slow.value"}}}
    handle = cluster.submit(program("fan-in", modules), strategy="dag")
    store = cluster.runtime.store
    messages = store.key(handle.execution_id, "dag:messages")
    # When the fast parents are done and the slow one runs
    wait_for(lambda: store.client.llen(key), timeout=30, what="the slow parent to start")
    stored = wait_for(lambda: store.client.hget(messages, "child"), timeout=10, what="the child's stored message")
    # Then the child's task message waits in the store (sent by the first parent's count only)
    assert json.loads(stored)["headers"]["id"] == task_id(handle.execution_id, "child")
    if lose_it:  # e.g. deleted by hand: the last parent's worker dispatches the child itself
        store.client.hdel(messages, "child")
    result = handle.get(timeout=60, propagate=False)
    # And the child runs once its last parent is done, with every parent's value; its message is gone
    assert result.status is ExecutionStatus.SUCCEEDED, result.error
    assert values(cluster, result)["child"] == 4
    assert not store.client.hexists(messages, "child")
    cluster.stop()


def test_worker_killed_during_a_module_it_took_next_the_execution_completes(make_cluster) -> None:
    # Given a one-slot worker (short visibility timeout) and two independent modules, the second slow
    cluster = make_cluster(visibility_timeout_s=3)
    doomed = cluster.start_worker("default", concurrency=1, pool="threads", env={"DSPEX_VISIBILITY_TIMEOUT_S": "3"})
    key = f"{cluster.settings.namespace}:side:{uuid.uuid4().hex[:8]}"
    modules = {"a_first": {"uses": STEP},
               "b_slow": {"uses": ANNOUNCED, "inputs": {"key": key, "ms": 2500}}}
    handle = cluster.submit(program("took-next", modules), strategy="dag")
    # When it is killed (-9) while it runs the second, taken off the queue in the first's task
    started = kill_once_started(cluster, doomed, key)
    assert started == [task_id(handle.execution_id, "a_first")]
    # Then the execution completes, the slow module run again elsewhere
    result = handle.get(timeout=60, propagate=False)
    assert result.status is ExecutionStatus.SUCCEEDED, result.error
    assert set(outputs(cluster, result)) == {"a_first", "b_slow"}
    assert result.modules["b_slow"].lost_attempts == 1
    assert not result.modules["b_slow"].worker.startswith(doomed.name)
    cluster.stop()


def test_a_chain_at_its_bound_releases_its_last_lease_in_the_count(make_cluster) -> None:
    # Given one slot whose chains end after two modules, and five independent modules, watched with MONITOR
    cluster = make_cluster()
    cluster.start_worker("default", concurrency=1, pool="threads", env={"DSPEX_DAG_CONTINUATION": "2"})
    unacked = UnackedKeys.of(cluster.runtime.app)
    modules = {f"m{index}": {"uses": STEP, "inputs": {"ms": 20}} for index in range(5)}
    releases: list[dict] = []
    with cluster.runtime.store.client.monitor() as monitor:
        handle = cluster.submit(program("bounded", modules), strategy="dag")
        result = handle.get(timeout=60)
        deadline = time.time() + 3
        for command in monitor.listen():  # until the result's script and a little after
            if command["command"].startswith(f"HDEL {unacked.messages} {TAG_PREFIX}{handle.execution_id}"):
                releases.append(command)
            if time.time() > deadline:
                break
    # Then modules ran under leases, and each lease was released by the script that stored its
    # module's success (the last of a chain too), not by a round trip of its own
    assert result.status is ExecutionStatus.SUCCEEDED
    assert len(continued(cluster, result)) >= 2
    assert releases and all(command["client_type"] == "lua" for command in releases), releases
    cluster.stop()


def scripts_seen(monitor: Any, until: float) -> list[list[str]]:
    """The commands MONITOR shows until ``until``, grouped by the script that ran them (a command not
    inside a script is a group of its own)."""
    groups: list[list[str]] = []
    for command in monitor.listen():
        if command["client_type"] == "lua" and groups:
            groups[-1].append(command["command"])
        else:
            groups.append([command["command"]])
        if time.time() > until:
            return groups
    return groups


def test_a_continued_child_is_begun_by_the_count_that_leases_it(make_cluster) -> None:
    # Given one slot, and a chain a -> b -> c whose b has a circuit breaker (a begin step of its own),
    # watched with MONITOR
    cluster = make_cluster()
    cluster.start_worker("default", concurrency=1, pool="threads")
    data = as_steps(synthetic.layered(3, 1, name="ahead"))
    data["modules"]["m1_0"]["circuit_breaker"] = {"failures": 3, "reset_s": 60}
    store = cluster.runtime.store
    with store.client.monitor() as monitor:
        handle = cluster.submit(program("ahead", data["modules"]), strategy="dag")
        result = handle.get(timeout=60)
        groups = scripts_seen(monitor, time.time() + 2)
    # Then b and c ran in a's task, with their own records and the outputs of plain dag
    assert result.status is ExecutionStatus.SUCCEEDED
    assert continued(cluster, result) == ["m1_0", "m2_0"]
    assert values(cluster, result) == {"m0_0": 1, "m1_0": 2, "m2_0": 3}
    assert all(result.modules[name].started_at and result.modules[name].finished_at for name in result.modules)
    # And each one's running record was written by the script that counted its parent, which took
    # b's circuit verdict too: no begin round trip of their own
    records, done = store.key(handle.execution_id, "rec"), store.key(handle.execution_id, "dag:done")
    circuit = store.global_key("breaker:ahead.m1_0")
    for parent, child in (("m0_0", "m1_0"), ("m1_0", "m2_0")):
        begins = [group for group in groups
                  if any(c.startswith(f'HSET {records} {child} {{"status":"running"') for c in group)]
        assert len(begins) == 1, begins
        assert f"SADD {done} {parent}" in begins[0], begins[0]
        if child == "m1_0":
            assert any(circuit in c for c in begins[0]), begins[0]
    cluster.stop()


def begin_groups(groups: list[list[str]], records: str, module: str) -> list[list[str]]:
    """The scripts among ``groups`` that stored ``module``'s running record in the hash ``records``."""
    return [group for group in groups if any(c.startswith(f'HSET {records} {module} {{"status":"running"') for c in group)]


def test_a_module_taken_next_is_begun_by_the_count_that_takes_it(make_cluster) -> None:
    # Given one slot and three modules without dependencies, all queued at the start, each with a circuit
    # breaker, the last one's open, watched with MONITOR
    cluster = make_cluster()
    cluster.start_worker("default", concurrency=1, pool="threads")
    modules = {name: {"uses": STEP, "inputs": {"ms": 20}, "circuit_breaker": {"failures": 3, "reset_s": 60}}
               for name in ("a", "b", "c")}
    store = cluster.runtime.store
    circuit = store.global_key("breaker:taken.c")
    store.client.hset(circuit, mapping={"state": "open", "opened_at": int(time.time() * 1000), "reset_ms": 60000})
    store.client.expire(circuit, 600)
    with store.client.monitor() as monitor:
        handle = cluster.submit(program("taken", modules), strategy="dag")
        result = handle.get(timeout=60, propagate=False)
        groups = scripts_seen(monitor, time.time() + 2)
    # Then b and c were taken from the queue by the count of the module before them, which stored
    # their running record and took their circuit's verdict: no begin round trip of their own
    records, done = store.key(handle.execution_id, "rec"), store.key(handle.execution_id, "dag:done")
    for before, taken in (("a", "b"), ("b", "c")):
        begins = begin_groups(groups, records, taken)
        assert len(begins) == 1, begins
        assert f"SADD {done} {before}" in begins[0], begins[0]
        assert any(store.global_key(f"breaker:taken.{taken}") in c for c in begins[0]), begins[0]
    # And they ran in a's task, the verdict kept: c failed fast on its open circuit, without a call
    assert [result.modules[name].status.value for name in ("a", "b", "c")] == ["succeeded", "succeeded", "failed"]
    assert "circuit 'taken.c' is open" in (result.modules["c"].error or "")
    assert outputs(cluster, result)["b"]["task"] == task_id(handle.execution_id, "a")
    assert "c" not in outputs(cluster, result)
    assert all(record.worker and record.started_at and record.attempts == 1 for record in result.modules.values())
    store.client.delete(circuit)
    cluster.stop()


def test_a_module_with_many_children_queues_the_most_urgent_in_its_count_and_the_rest_right_after(
        make_cluster) -> None:
    # Given one slot, and a source with 40 children, watched with MONITOR
    cluster = make_cluster()
    cluster.start_worker("default", concurrency=1, pool="threads")
    data = as_steps(synthetic.fan_out(40, name="wide"))
    store = cluster.runtime.store
    with store.client.monitor() as monitor:
        handle = cluster.submit(program("wide", data["modules"], outputs=data["outputs"]), strategy="dag")
        result = handle.get(timeout=60)
        groups = scripts_seen(monitor, time.time() + 2)
    # Then the source's count pushed the messages of its most urgent children itself (one more is leased
    # to the slot), and the other children's messages went out right after it, noted as queued
    done, queued = (store.key(handle.execution_id, part) for part in ("dag:done", "dag:queued"))
    counts = [group for group in groups if f"SADD {done} source" in group]
    assert len(counts) == 1
    assert len([c for c in counts[0] if c.startswith("LPUSH ")]) == INLINE_MESSAGES - 1
    after = [c for group in groups[groups.index(counts[0]) + 1:] for c in group]
    noted = next(c for c in after if c.startswith(f"SADD {queued} "))
    assert len(noted.split()) - 2 == 40 - INLINE_MESSAGES
    # And every child ran once, the sink saw them all
    assert result.status is ExecutionStatus.SUCCEEDED and result.outputs == {"total": 81}
    assert all(record.attempts == 1 for record in result.modules.values())
    cluster.stop()


def test_a_taken_module_whose_begin_steps_differ_is_begun_on_its_own(make_cluster) -> None:
    # Given one slot and two queued modules: a with a circuit breaker, b without (no begin step)
    cluster = make_cluster()
    cluster.start_worker("default", concurrency=1, pool="threads")
    modules = {"a": {"uses": STEP, "inputs": {"ms": 20}},
               "b": {"uses": STEP, "inputs": {"ms": 20}, "circuit_breaker": {"enabled": False}}}
    store = cluster.runtime.store
    with store.client.monitor() as monitor:
        handle = cluster.submit(program("shapes", modules), strategy="dag")
        result = handle.get(timeout=60)
        groups = scripts_seen(monitor, time.time() + 2)
    # Then a's count took b (b ran in a's task) but did not begin it with a's kind of begin: b's own
    # begin script stored its running record, and both succeeded
    records, done = store.key(handle.execution_id, "rec"), store.key(handle.execution_id, "dag:done")
    assert result.status is ExecutionStatus.SUCCEEDED
    assert outputs(cluster, result)["b"]["task"] == task_id(handle.execution_id, "a")
    begins = begin_groups(groups, records, "b")
    assert len(begins) == 1 and not any(c.startswith(f"SADD {done} ") for c in begins[0]), begins
    cluster.stop()


def test_a_queued_message_with_a_broken_begin_spec_fails_no_count(make_cluster) -> None:
    # Given one slot running the first of two modules, and queued next a message no worker wrote: a dag
    # lead for an unknown execution and a begin spec of the worker's own shape whose keys name a hash it
    # must not touch and whose args do not add up
    cluster = make_cluster()
    cluster.start_worker("default", concurrency=1, pool="threads")
    store, queues, namespace = cluster.runtime.store, cluster.runtime.queues, cluster.settings.namespace
    assert queues is not None
    modules = {"a": {"uses": STEP, "inputs": {"ms": 300}}, "b": {"uses": STEP, "inputs": {"ms": 20}}}
    handle = cluster.submit(program("behind", modules), strategy="dag")
    plan = store.plan(handle.execution_id)
    assert plan is not None
    spec = _begin_spec(Execution(cluster.runtime, handle.execution_id), plan, "a")
    assert spec is not None
    victim = f"{namespace}:victim"
    store.client.hset(victim, "kept", "1")
    stray = json.dumps({LEAD_KEY: f"10{uuid.uuid4().hex}.x",
                        BEGIN_LEAD_KEY: [spec[0], [victim, victim, f"{namespace}:none", f"{namespace}:none", victim],
                                         ["x", "60", "", "9", "0"]],
                        "body": "", "headers": {"task": "dspex.run_module"}})
    wait_for(lambda: store.client.hget(store.key(handle.execution_id, "rec"), "a"), 30, "a to start")
    store.client.rpush(queues.key(f"{namespace}.default", 0), stray)  # next in line (the RPOP end)
    # When a's count takes it
    result = handle.get(timeout=60)
    # Then the execution succeeded, the hash the spec named is as it was, and no lease is left behind
    assert result.status is ExecutionStatus.SUCCEEDED
    assert store.client.hgetall(victim) == {"kept": "1"}
    unacked = UnackedKeys.of(cluster.runtime.app)
    wait_for(lambda: not store.client.hlen(unacked.messages), timeout=10, what="every lease to be acked")
    store.client.delete(victim)
    cluster.stop()


@pytest.mark.parametrize("how", ["cancel", "timeout"])
def test_a_continued_module_on_a_prefork_worker_is_stopped_when_its_execution_ends(make_cluster, how: str) -> None:
    # Given a prefork worker running a chain first -> slow, slow continued inside first's task
    from tests.modules.faulty import side_channel

    cluster = make_cluster()
    cluster.start_worker("default", concurrency=1, pool="prefork")
    key = f"{cluster.settings.namespace}:side:{uuid.uuid4().hex[:8]}"
    modules = {"first": {"uses": STEP},
               "slow": {"uses": "tests.modules.faulty:sleeper", "inputs": {"key": key, "seconds": 30},
                        "depends_on": ["first"]}}
    handle = cluster.submit(program(f"stopped-{how}", modules), strategy="dag", timeout=6 if how == "timeout" else None)
    pid = int(wait_for(lambda: side_channel().hget(key, "pid"), timeout=30, what="the slow module to start"))
    # When the execution is cancelled, or times out, while the continued module runs
    if how == "cancel":
        result = handle.cancel()
        assert result.status is ExecutionStatus.CANCELLED
    else:
        result = handle.get(propagate=False)  # waits out the submission's timeout, then ends it
        assert result.status is ExecutionStatus.FAILED and "timed out" in (result.error or "")
    # Then its pool process is ended within seconds, and the module never finishes
    wait_for(lambda: not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z",
             timeout=10, what=f"pool process {pid} to end")
    time.sleep(1)
    assert not side_channel().hexists(key, "done")
    assert result.modules["slow"].status.value == "cancelled"
    cluster.stop()


@pytest.mark.parametrize("how", ["grandchild", "taken-next"])
def test_a_prefork_pool_process_killed_deep_in_a_chain_is_rerun_without_waiting_for_the_sweep(
        make_cluster, how: str) -> None:
    # Given a one-slot prefork worker (visibility timeout: the default hour) running a chain whose third
    # module is slow: a grandchild of the module whose task it runs in, or a module it took off the queue
    # after that module's child
    from tests.modules.faulty import side_channel

    cluster = make_cluster()
    cluster.start_worker("default", concurrency=1, pool="prefork")
    key = f"{cluster.settings.namespace}:side:{uuid.uuid4().hex[:8]}"
    slow = {"uses": "tests.modules.faulty:slow_first_call", "inputs": {"key": key, "seconds": 60}}
    modules = {"a": {"uses": STEP}, "b": {"uses": STEP, "inputs": {"a": "$a.value"}},
               "slow": {**slow, "depends_on": ["b"]} if how == "grandchild" else slow}
    handle = cluster.submit(program(f"deep-kill-{how}", modules), strategy="dag")
    pid = int(wait_for(lambda: side_channel().lindex(f"{key}:pids", 0), timeout=30, what="the slow module to start"))
    unacked = UnackedKeys.of(cluster.runtime.app)
    assert cluster.runtime.store.client.hexists(unacked.messages, TAG_PREFIX + task_id(handle.execution_id, "slow"))
    # When its pool process is killed (-9) while the slow module runs (leased to the chain)
    os.kill(pid, signal.SIGKILL)
    # Then the slow module runs again at once (its lease goes back with the task it ran in), and the
    # execution completes with every output
    result = handle.get(timeout=30, propagate=False)
    assert result.status is ExecutionStatus.SUCCEEDED, result.error
    assert set(outputs(cluster, result)) == {"a", "b", "slow"}
    assert outputs(cluster, result)["slow"]["calls"] == 2
    assert result.modules["slow"].lost_attempts == 1
    cluster.stop()


def test_a_chain_that_ends_in_a_retry_or_a_failure_leaves_no_lease_and_no_note(make_cluster) -> None:
    # Given a one-slot worker and a chain whose continued modules retry once, or fail
    cluster = make_cluster()
    cluster.start_worker("default", concurrency=1, pool="threads")
    key = f"{cluster.settings.namespace}:side:{uuid.uuid4().hex[:8]}"
    modules = {"a": {"uses": STEP},
               "retried": {"uses": "tests.modules.faulty:flaky", "inputs": {"key": key, "failures": 1},
                           "depends_on": ["a"], "retry": {"max_attempts": 2, "backoff_s": 0.1, "jitter": False}},
               "failed": {"uses": "tests.modules.faulty:counted", "inputs": {"key": key, "name": "failed"},
                          "depends_on": ["retried"]}}
    cluster.runtime.store.client.sadd(f"{key}:broken", "failed")
    # When it runs
    result = cluster.submit(program("retry-chain", modules), strategy="dag").get(timeout=60, propagate=False)
    # Then the retry ran, the failure is recorded, and neither a lease nor a chain's note is left
    assert result.modules["retried"].attempts == 2
    assert result.modules["failed"].status.value == "failed"
    unacked = UnackedKeys.of(cluster.runtime.app)
    wait_for(lambda: not cluster.runtime.store.client.hlen(unacked.messages), timeout=5,
             what="every lease and message to be acked")
    assert not cluster.runtime.store.client.keys(f"{cluster.settings.namespace}:chain:*")
    cluster.stop()


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_a_chain_that_runs_longer_than_the_visibility_timeout_runs_each_module_once(make_cluster, pool: str) -> None:
    # Given two workers with a 3 s visibility timeout, and a line of six 1 s modules: one slot runs them
    # all in the first one's task, 6 s, though each module runs well within the timeout
    cluster = make_cluster(visibility_timeout_s=3)
    for _ in range(2):
        cluster.start_worker("default", concurrency=1, pool=pool, env={"DSPEX_VISIBILITY_TIMEOUT_S": "3"})
    key = f"{cluster.settings.namespace}:side:{uuid.uuid4().hex[:8]}"
    modules = {f"m{index}": {"uses": ANNOUNCED, "inputs": {"key": key, "ms": 1000,
                                                           **({"a": f"$m{index - 1}.value"} if index else {})}}
               for index in range(6)}
    result = cluster.run(program("long_chain", modules), strategy="dag", timeout=60)
    assert result.status is ExecutionStatus.SUCCEEDED, result.error
    # Then the broker never took the chain's task for lost while it ran: every module ran once, in it
    time.sleep(4)  # a re-delivery would run by now
    ran = cluster.runtime.store.client.lrange(key, 0, -1)
    assert ran == [task_id(result.execution_id, "m0")] * 6, ran
    assert all(record.lost_attempts == 0 and record.attempts == 1 for record in result.modules.values())
