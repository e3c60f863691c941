"""The `dag` strategy on real workers: same outputs as `levels`, no double runs, no barriers."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from dspex_celery import ExecutionStatus, ModuleStatus, Program
from dspex_celery.examples import synthetic
from dspex_celery.plan import build_plan
from dspex_celery.redis_queues import LEAD_KEY
from dspex_celery.results import parse_time
from dspex_celery.strategies.dag import _TAKE_NEXT
from dspex_celery.strategies.registry import recommend_strategy
from tests.conftest import Cluster, program, unique
from tests.modules import dag_mods
from tests.modules.basic import DIAMOND

pytestmark = pytest.mark.integration

COUNTED = "tests.modules.dag_mods:counted"


@pytest.fixture(scope="module")
def cluster(make_cluster) -> Cluster:
    cluster = make_cluster()
    cluster.start_worker("default", "io", concurrency=4, pool="threads")
    cluster.start_worker("default", "llm", concurrency=4, pool="threads")
    return cluster


def expected_sinks(data: dict, outputs: dict) -> dict:
    expected = synthetic.expected_values(data)
    return {name: {"value": expected[name]} for name in outputs}


@pytest.mark.parametrize(
    "data",
    [
        synthetic.fan_out(40),
        synthetic.chain(30),
        synthetic.layered(6, 4),
        synthetic.random_dag(80, seed=5),
        synthetic.random_dag(80, seed=6, max_parents=5),
    ],
    ids=["fan-out-in", "deep-chain", "layered", "random-5", "random-6"],
)
def test_dag_gives_the_same_outputs_as_levels(cluster: Cluster, data: dict) -> None:
    dag = cluster.run(Program.from_dict(data), strategy="dag")
    levels = cluster.run(Program.from_dict(data), strategy="levels")
    assert dag.status is ExecutionStatus.SUCCEEDED and dag.strategy == "dag"
    assert dag.outputs == levels.outputs
    if "outputs" not in data:
        assert dag.outputs == expected_sinks(data, dag.outputs)
    assert all(record.attempts == 1 for record in dag.modules.values())


def test_diamond_with_resource_classes(cluster: Cluster) -> None:
    # A child of an `io` module may run on an `llm` worker
    data = DIAMOND
    result = cluster.run(Program.from_dict(data), {"x": 4}, strategy="dag")
    assert result.outputs == {"result": 25, "top": {"sum": 5}}
    io_worker, llm_worker = cluster.workers
    assert result.modules["top"].worker.startswith(io_worker.name + "@")
    assert result.modules["left"].worker.startswith(llm_worker.name + "@")


def race_program(diamonds: int, token: str) -> Program:
    """Many diamonds whose two parents take the same time, so they finish together."""
    modules = {}
    for i in range(diamonds):
        modules[f"top{i}"] = {"uses": COUNTED, "inputs": {"key": f"{token}:top{i}"}}
        for side in ("l", "r"):
            modules[f"{side}{i}"] = {"uses": COUNTED, "inputs": {"key": f"{token}:{side}{i}", "ms": 5, "x": f"$top{i}.value"}}
        modules[f"join{i}"] = {
            "uses": COUNTED,
            "inputs": {"key": f"{token}:join{i}", "a": f"$l{i}.value", "b": f"$r{i}.value"},
        }
    return Program.from_dict({"name": "race", "modules": modules})


def test_parent_pair_race_never_double_runs_or_loses_a_join(cluster: Cluster) -> None:
    token = uuid.uuid4().hex
    results = [cluster.submit(race_program(25, f"{token}-{n}"), strategy="dag") for n in range(4)]
    for n, handle in enumerate(results):
        result = handle.get(timeout=120)
        assert result.status is ExecutionStatus.SUCCEEDED
        for i in range(25):
            assert result.outputs[f"join{i}"] == {"value": 5}  # 1 + (2 + 2)
            for module in ("top", "l", "r", "join"):
                assert dag_mods.calls(f"{token}-{n}:{module}{i}") == 1


def test_100_concurrent_executions_keep_their_own_outputs(cluster: Cluster) -> None:
    data = {
        "name": "three",
        "inputs": ["x"],
        "modules": {
            "a": {"uses": "tests.modules.basic:add", "inputs": {"a": "$inputs.x", "b": 1}},
            "b": {"uses": "tests.modules.basic:mul", "inputs": {"a": "$a.sum", "b": 3}},
            "c": {"uses": "tests.modules.basic:add", "inputs": {"a": "$b.product", "b": "$inputs.x"}},
        },
        "outputs": {"c": "$c.sum"},
    }
    prog = Program.from_dict(data)
    with ThreadPoolExecutor(8) as pool:
        handles = list(pool.map(lambda x: cluster.submit(prog, {"x": x}, strategy="dag"), range(100)))
    for x, handle in enumerate(handles):
        assert handle.get(timeout=120).outputs == {"c": (x + 1) * 3 + x}


def test_fast_branch_child_starts_before_slow_sibling_finishes(cluster: Cluster) -> None:
    # Given two branches from one root: a slow module, and a fast module with a child
    data = {
        "name": "branches",
        "modules": {
            "root": {"uses": "tests.modules.basic:add", "inputs": {"a": 1, "b": 1}},
            "slow": {"uses": "tests.modules.basic:sleep", "inputs": {"seconds": 1.0, "value": "$root.sum"}},
            "fast": {"uses": "tests.modules.basic:sleep", "inputs": {"seconds": 0.01, "value": "$root.sum"}},
            "after_fast": {"uses": "tests.modules.basic:echo", "inputs": {"v": "$fast.value"}},
        },
    }
    dag = cluster.run(Program.from_dict(data), strategy="dag").modules
    levels = cluster.run(Program.from_dict(data), strategy="levels").modules
    # Then under dag the fast branch's child starts before the slow sibling finishes
    assert parse_time(dag["after_fast"].started_at) < parse_time(dag["slow"].finished_at)
    # while the level barrier makes it wait under levels
    assert parse_time(levels["after_fast"].started_at) >= parse_time(levels["slow"].finished_at)


def failing_program(tolerance: object) -> Program:
    return program(
        "failing",
        {
            "ok": {"uses": "tests.modules.basic:add", "inputs": {"a": 1, "b": 2}},
            "bad": {"uses": "tests.modules.basic:fail", "inputs": {"message": "no"}},
            "after_bad": {"uses": "tests.modules.basic:echo", "inputs": {"v": "$bad"}},
            "after_after": {"uses": "tests.modules.basic:echo", "inputs": {"v": "$after_bad"}},
            "after_ok": {"uses": "tests.modules.basic:echo", "inputs": {"v": "$ok.sum"}},
        },
        failure_tolerance=tolerance,
    )


def test_dag_strict_failure_fails_fast(cluster: Cluster) -> None:
    result = cluster.run(failing_program("strict"), strategy="dag", timeout=60)
    assert result.status is ExecutionStatus.FAILED
    assert result.modules["bad"].status is ModuleStatus.FAILED and result.modules["bad"].attempts == 1
    assert "ValueError: no" in result.error
    assert result.modules["after_after"].status in (ModuleStatus.CANCELLED, ModuleStatus.SKIPPED)


def test_dag_tolerant_failure_skips_dependents(cluster: Cluster) -> None:
    result = cluster.run(failing_program("tolerant"), strategy="dag", timeout=60)
    assert result.status is ExecutionStatus.SUCCEEDED and result.failed_modules == ["bad"]
    assert result.modules["after_bad"].status is ModuleStatus.SKIPPED
    assert result.modules["after_after"].status is ModuleStatus.SKIPPED
    assert "upstream module 'bad' failed" in result.modules["after_bad"].error
    assert result.outputs["after_ok"] == {"v": 3}


def test_tolerant_failure_above_a_deep_branch_skips_all_of_it(cluster: Cluster) -> None:
    # A failed module with 400 descendants in a chain: each skip counts the next one
    modules = {"bad": {"uses": "tests.modules.basic:fail"},
               "ok": {"uses": "tests.modules.basic:add", "inputs": {"a": 1, "b": 2}}}
    for i in range(400):
        modules[f"d{i}"] = {"uses": "tests.modules.basic:add", "inputs": {"a": 1, "b": 2},
                            "depends_on": [f"d{i - 1}" if i else "bad"]}
    data = {"name": "deep-skip", "modules": modules, "failure_tolerance": "tolerant", "outputs": {"ok": "$ok"}}
    result = cluster.run(Program.from_dict(data), strategy="dag", timeout=90)
    assert result.status is ExecutionStatus.SUCCEEDED and result.failed_modules == ["bad"]
    assert all(result.modules[f"d{i}"].status is ModuleStatus.SKIPPED for i in range(400))
    assert result.outputs == {"ok": {"sum": 3}}


def test_default_strategy_choice() -> None:
    balanced = build_plan(Program.from_dict(synthetic.fan_out(5)).spec)
    unbalanced = build_plan(Program.from_dict(synthetic.random_dag(30, seed=2)).spec)
    assert recommend_strategy(balanced)[0] == "levels"
    strategy, reason = recommend_strategy(unbalanced)
    assert strategy == "dag" and "unbalanced" in reason
    # durations observed within a level that differ widely also make dag the choice
    assert recommend_strategy(balanced, {"w0": 1.0, "w1": 0.01})[0] == "dag"


def test_1000_module_program(cluster: Cluster) -> None:
    data = synthetic.random_dag(1000, seed=9)
    result = cluster.run(Program.from_dict(data), strategy="dag", timeout=300)
    assert result.status is ExecutionStatus.SUCCEEDED and len(result.modules) == 1000
    assert result.outputs == expected_sinks(data, result.outputs)


@pytest.mark.parametrize("dispatch", ["enqueued by the count", "published by the worker"])
def test_worker_dying_after_a_module_succeeds_never_loses_its_children(make_cluster, dispatch: str) -> None:
    # Given a worker that dies (no ack, no cleanup) right after module `a` has stored its success —
    # with task-sent events on, it publishes the children through Celery and dies doing so — and a
    # second worker serving the children's resource class
    publish = dispatch == "published by the worker"
    cluster: Cluster = make_cluster(visibility_timeout_s=2)
    env = {"DSPEX_TEST_DIE_AFTER": "a", **({"DSPEX_SENT_EVENTS": "1"} if publish else {})}
    doomed = cluster.start_worker("doomed", concurrency=1, pool="threads",
                                  extra_args=("--include", "tests.modules.die_after"), env=env)
    cluster.start_worker("default", concurrency=2, pool="threads")
    token = uuid.uuid4().hex
    data = {"name": "dying", "modules": {
        "a": {"uses": COUNTED, "inputs": {"key": f"{token}:a"}, "resource": "doomed"},
        **{name: {"uses": COUNTED, "inputs": {"key": f"{token}:{name}", "x": "$a.value"}} for name in ("b", "c")},
    }}
    # When the program runs under dag and the worker has died
    handle = cluster.submit(Program.from_dict(data), strategy="dag")
    assert doomed.process.wait(timeout=30) != 0
    if publish:  # `a`'s unacked task is restored by a worker of its class started past the visibility timeout
        time.sleep(3)
        cluster.start_worker("doomed", concurrency=1, pool="threads",
                             env={"DSPEX_SENT_EVENTS": "1", "DSPEX_VISIBILITY_TIMEOUT_S": "2"})
    result = handle.get(timeout=60)
    # Then the children still ran, exactly once each, and `a` was not run again
    assert result.status is ExecutionStatus.SUCCEEDED
    assert result.outputs == {"b": {"value": 2}, "c": {"value": 2}}
    assert [dag_mods.calls(f"{token}:{name}") for name in "abc"] == [1, 1, 1]


def test_the_last_count_claims_the_finish_in_the_same_script(cluster: Cluster) -> None:
    # Given a dag execution whose last module is a sink, watched with MONITOR
    client = cluster.runtime.store.client
    commands: list[dict] = []
    with client.monitor() as monitor:
        handle = cluster.submit(program(unique("claim"), {
            "a": {"uses": "tests.modules.basic:add", "inputs": {"a": 1, "b": 2}},
            "b": {"uses": "tests.modules.basic:add", "inputs": {"a": "$a.sum", "b": 1}},
        }), strategy="dag")
        result = handle.get(timeout=30)
        finished_key = cluster.runtime.store.key(handle.execution_id, "finished")
        open_key = cluster.runtime.store.key(handle.execution_id, "dag:open")
        deadline = time.time() + 20
        for command in monitor.listen():  # what Redis ran meanwhile, in order (Lua's own commands too)
            commands.append(command)
            if command["command"].startswith(f"SET {finished_key} ") or time.time() > deadline:
                break
    # Then the execution succeeded, and its finish was claimed by the script that counted its last module
    assert result.status is ExecutionStatus.SUCCEEDED and result.outputs
    assert f"DECR {open_key}" in script_of(commands, lambda line: line.startswith(f"SET {finished_key} "))


def test_the_result_and_its_history_event_go_out_in_one_script(cluster: Cluster) -> None:
    # Given a dag execution, watched with MONITOR
    client = cluster.runtime.store.client
    commands: list[dict] = []
    with client.monitor() as monitor:
        handle = cluster.submit(program(unique("publish"), {
            "a": {"uses": "tests.modules.basic:add", "inputs": {"a": 1, "b": 2}}}), strategy="dag")
        assert handle.get(timeout=30).status is ExecutionStatus.SUCCEEDED
        result_key = cluster.runtime.app.backend.get_key_for_task(handle.execution_id).decode()
        deadline = time.time() + 20
        for command in monitor.listen():
            commands.append(command)
            if (command["command"].startswith("XADD") and handle.execution_id in command["command"]
                    and " finished " in command["command"]) or time.time() > deadline:
                break
    # Then the script that stored the Celery result also appended the execution's finished event
    script = script_of(commands, lambda line: line.startswith("XADD") and " finished " in line)
    assert any(line.startswith(f"SET {result_key} ") for line in script)


def script_of(commands: list[dict], last: Callable[[str], bool]) -> list[str]:
    """The commands (MONITOR entries) a Lua script ran, up to the first one ``last`` accepts ([] if none)."""
    script: list[str] = []
    for command in commands:
        if command["client_type"] != "lua":
            script = []
        elif last(command["command"]):
            return [*script, command["command"]]
        else:
            script.append(command["command"])
    return []


def _take_next_script() -> str:
    """The count's take_next() on its own: n = 0 children, the worker's lists from KEYS[1]; returns
    the leased task id and its queue, or nothing."""
    return ("local a, n, first, own = 1, 0, 1, ARGV[10]\nlocal taken = {}\n"
            "local function lease(id, message, queue) taken = {id, queue} end\n"
            "local function take_begin(raw, j) return false end\n"
            f"local function take_next()\n{_TAKE_NEXT}end\ntake_next()\nreturn taken")


@pytest.mark.parametrize(("head", "timeouts", "taken"), [
    ("own", "0", True),  # this execution's next module
    ("chained", "0", True),  # another dag execution's, whose lead allows a chain
    ("unchained", "0", False),  # another execution's without it (its plan has a backup)
    ("limited", "0", False),  # a Celery time limit this worker could not enforce in a chain...
    ("limited", "1", True),  # ... and one it can
    ("no lead", "0", False),  # a message no dag count wrote (a retry with its countdown, another task)
    ("quoted id", "0", False),  # a task id the lead pattern cannot read whole
])
def test_a_slot_takes_only_a_message_whose_lead_allows_it(redis_url: str, head: str, timeouts: str,
                                                          taken: bool) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    own, other = f"{uuid.uuid4().hex}.", uuid.uuid4().hex
    leads = {"own": f"00{own}b", "chained": f"10{other}.b", "unchained": f"00{other}.b",
             "limited": f"11{other}.b", "quoted id": '10' + other + '.b\\"x'}
    envelope = {"body": "", "headers": {"task": "dspex.run_module"}}
    raw = json.dumps({LEAD_KEY: leads[head], **envelope} if head in leads else envelope)
    urgent, later = f"test-take-{uuid.uuid4().hex}", f"test-take-{uuid.uuid4().hex}"
    try:
        client.lpush(urgent, raw)
        client.lpush(later, json.dumps({LEAD_KEY: f"00{own}c", **envelope}))  # behind it: never jumped to
        reply = client.eval(_take_next_script(), 2, urgent, later,
                            *[""] * 7, "1", timeouts, own, 2, "q-urgent", "q-later")
        assert reply == ([leads[head][2:], "q-urgent"] if taken else [])
        assert client.llen(urgent) == (0 if taken else 1)
        assert client.llen(later) == 1
    finally:
        client.delete(urgent, later)
