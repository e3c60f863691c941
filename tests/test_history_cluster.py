"""History from a real cluster: worker subprocesses publish, a real listener subprocess writes.

Every module attempt is recorded exactly once (retries included); a listener killed mid-execution
and restarted, a client that exits right after submitting, or a lost history stream lose nothing.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dspex_celery import (
    ExecutionStatus,
    Program,
    UnservedResourceWarning,
    create_runtime,
    submit_program,
)
from dspex_celery.history.hooks import stream_key
from dspex_celery.history.listener import Listener
from tests.conftest import ROOT, HistoryCluster, program, wait_for

pytestmark = pytest.mark.integration

MODS = "tests.modules.history_mods"


@pytest.fixture(scope="module")
def hc(make_cluster, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HistoryCluster]:
    cluster = make_cluster()
    cluster.start_worker("default", "spare", concurrency=3)  # `spare`: served, nothing ever queued there
    url = f"sqlite:///{tmp_path_factory.mktemp('history') / 'history.db'}"
    history_cluster = HistoryCluster(cluster, url, redis_url)
    history_cluster.start_listener()
    yield history_cluster
    history_cluster.stop()


def flaky_program(redis_url: str, name: str = "flaky") -> Program:
    counter = f"history-test:{uuid.uuid4().hex}"
    return program(name, {
        "first": {"uses": f"{MODS}:nap", "inputs": {"seconds": 0.02}},
        "flaky": {"uses": f"{MODS}:flaky", "inputs": {"counter": counter, "redis_url": redis_url, "failures": 2},
                  "depends_on": ["first"], "retry": {"max_attempts": 4, "backoff_s": 0.05}},
        "side": {"uses": f"{MODS}:nap", "inputs": {"seconds": 0.02}, "depends_on": ["first"]},
        "last": {"uses": f"{MODS}:nap", "inputs": {"seconds": 0.01}, "depends_on": ["flaky", "side"]},
    })


EXPECTED_FLAKY = [
    ("first", 1, "succeeded"),
    ("flaky", 1, "retrying"),
    ("flaky", 2, "retrying"),
    ("flaky", 3, "succeeded"),
    ("last", 1, "succeeded"),
    ("side", 1, "succeeded"),
]


def test_every_attempt_is_recorded_exactly_once(hc: HistoryCluster) -> None:
    # When a program with a module that fails twice (transient) runs on the cluster
    result = hc.cluster.run(flaky_program(hc.redis_url))
    assert result.status is ExecutionStatus.SUCCEEDED and result.modules["flaky"].attempts == 3
    # Then history has one row per attempt, retries included, and nothing else
    recorded = hc.recorded(result.execution_id)
    assert hc.attempts(result.execution_id) == EXPECTED_FLAKY
    retried = [row for row in hc.history.attempts([result.execution_id]) if row.status == "retrying"]
    assert {row.error_type for row in retried} == {"TransientError"}
    assert all(row.worker == result.modules["flaky"].worker for row in retried)
    # And `show --json` prints exactly what the run returned
    assert recorded.to_json_dict() == result.to_json_dict()
    shown = hc.cli("show", result.execution_id, "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == result.to_json_dict()
    listed = json.loads(hc.cli("history", "--program", "flaky", "--json").stdout)
    assert result.execution_id in [item["execution_id"] for item in listed]


def gated_program(redis_url: str, gate: str) -> Program:
    return program("gated", {
        "before": {"uses": f"{MODS}:nap", "inputs": {"seconds": 0.01}},
        "wait": {"uses": f"{MODS}:gate", "inputs": {"key": gate, "redis_url": redis_url}, "depends_on": ["before"]},
        "after1": {"uses": f"{MODS}:nap", "inputs": {"seconds": 0.01}, "depends_on": ["wait"]},
        "after2": {"uses": f"{MODS}:nap", "inputs": {"seconds": 0.01}, "depends_on": ["after1"]},
    })


def open_gate(hc: HistoryCluster, gate: str) -> None:
    hc.cluster.runtime.store.client.set(gate, "1", ex=600)


def test_listener_killed_mid_execution_and_restarted_loses_nothing(hc: HistoryCluster) -> None:
    gate = f"history-gate:{uuid.uuid4().hex}"
    handle = hc.cluster.submit(gated_program(hc.redis_url, gate))
    # Given the listener has written the start of the execution
    wait_for(lambda: ("wait", 1, "running") in hc.attempts(handle.execution_id), 30, "gate never started")
    # When it is killed (no clean shutdown) and the execution finishes meanwhile
    hc.listeners[-1].stop(signal.SIGKILL)
    open_gate(hc, gate)
    result = handle.get(timeout=60)
    time.sleep(0.2)
    assert not hc.history.final_ids([handle.execution_id])  # nobody wrote the end
    # Then a new listener catches up: the complete history, once each
    hc.start_listener()
    assert hc.recorded(handle.execution_id).to_json_dict() == result.to_json_dict()
    assert hc.attempts(handle.execution_id) == [(name, 1, "succeeded") for name in ("after1", "after2", "before", "wait")]


def test_events_read_but_not_written_are_written_after_a_crash(hc: HistoryCluster) -> None:
    # Given a listener that read a batch and died before writing it (its events stay pending)
    hc.listeners[-1].stop()
    result = hc.cluster.run(flaky_program(hc.redis_url, "crash"))
    runtime = hc.cluster.runtime
    stream = stream_key(runtime.settings.namespace)
    consumer = "crash-test"
    read = runtime.store.client.xreadgroup("history", consumer, {stream: ">"}, count=1000)
    assert read and len(read[0][1]) >= len(EXPECTED_FLAKY) + 1  # records and the finish, now pending
    runtime.store.client.delete(*[runtime.store.key(result.execution_id, part) for part in ("plan", "rec", "attempts")])
    # When a listener with the same consumer name runs (reconciliation cannot help: the state is gone)
    listener = Listener(runtime, hc.history, consumer)
    listener.start()
    stop = threading.Event()
    thread = threading.Thread(target=listener.run, args=(stop,))
    thread.start()
    try:
        recorded = hc.recorded(result.execution_id)
    finally:
        stop.set()
        thread.join(timeout=10)
    # Then its pending events were written, and acknowledged
    assert hc.attempts(result.execution_id) == EXPECTED_FLAKY
    assert recorded.to_json_dict() == result.to_json_dict()
    assert runtime.store.client.xpending(stream, "history")["pending"] == 0
    hc.start_listener()


def test_history_survives_the_client_exiting_right_after_submit(hc: HistoryCluster, tmp_path: Path) -> None:
    # Given a client process that submits and exits at once (no waiting, no clean-up)
    script = tmp_path / "submit.py"
    script.write_text(
        "import os, sys\n"
        "from dspex_celery import Program, create_runtime, load_settings, submit_program\n"
        "program = Program.from_dict({'name': 'orphan', 'modules': {\n"
        f"  'a': {{'uses': '{MODS}:nap', 'inputs': {{'seconds': 0.3}}}},\n"
        f"  'b': {{'uses': '{MODS}:nap', 'inputs': {{'seconds': 0.1}}, 'depends_on': ['a']}}}}}})\n"
        "handle = submit_program(program, {}, app=create_runtime(load_settings()).app)\n"
        "print(handle.execution_id, flush=True)\n"
        "os._exit(0)\n"
    )
    done = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=hc.cluster.env(), capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    execution_id = done.stdout.split()[-1]
    # Then the execution is recorded to its end
    recorded = hc.recorded(execution_id)
    assert recorded.status is ExecutionStatus.SUCCEEDED
    assert hc.attempts(execution_id) == [("a", 1, "succeeded"), ("b", 1, "succeeded")]


def test_listener_reconciles_from_the_state_store_when_the_stream_is_lost(hc: HistoryCluster) -> None:
    # Given an execution (with retries) run while no listener ran, and its stream events lost
    hc.listeners[-1].stop()
    result = hc.cluster.run(flaky_program(hc.redis_url, "reconciled"))
    hc.cluster.runtime.store.client.delete(stream_key(hc.cluster.settings.namespace))
    # When a listener starts, it rebuilds the history from the state store, every attempt included
    listener = hc.start_listener()
    assert "reconciled" in listener.log.read_text() and "reconciled 0 " not in listener.log.read_text()
    assert hc.recorded(result.execution_id).to_json_dict() == result.to_json_dict()
    assert hc.attempts(result.execution_id) == EXPECTED_FLAKY


def test_status_shows_live_executions_and_queue_depths(hc: HistoryCluster) -> None:
    gate = f"history-gate:{uuid.uuid4().hex}"
    prog = program("live", {
        "wait": {"uses": f"{MODS}:gate", "inputs": {"key": gate, "redis_url": hc.redis_url}},
        "queued": {"uses": f"{MODS}:nap", "resource": "nobody"},  # no worker serves `nobody`
    })
    with pytest.warns(UnservedResourceWarning, match="'nobody'"):
        handle = hc.cluster.submit(prog, timeout=60)
    wait_for(lambda: handle.records().get("wait") and handle.records()["wait"].status.value == "running", 30)
    shown = hc.cli("status", "--json")
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    live = {item["execution_id"]: item for item in data["live"]}
    assert live[handle.execution_id]["program"] == "live"
    assert live[handle.execution_id]["modules"] == {"pending": 1, "running": 1}
    assert data["queues"]["nobody"] == 1 and data["queues"]["default"] == 0
    assert data["queues"]["spare"] == 0  # a class a live worker serves is listed before anything waits there
    open_gate(hc, gate)
    hc.cluster.runtime.store.client.zrem(hc.cluster.runtime.store.global_key("live"), handle.execution_id)


def test_optimize_names_the_slow_module_and_later_runs_use_the_profile(hc: HistoryCluster) -> None:
    nap = f"{MODS}:nap"
    modules = {
        "start": {"uses": nap, "inputs": {"seconds": 0.01}},
        **{f"quick{i}": {"uses": nap, "inputs": {"seconds": 0.02}, "depends_on": ["start"]} for i in range(3)},
        "slow": {"uses": nap, "inputs": {"seconds": 0.4}, "depends_on": ["start"]},
        "end": {"uses": nap, "inputs": {"seconds": 0.01}, "depends_on": ["quick0", "quick1", "quick2", "slow"]},
    }
    prog = program("slowone", modules)
    for _ in range(3):
        hc.recorded(hc.submit(prog, use_profile=False).get(timeout=60).execution_id)
    # When the optimizer reads that history
    done = hc.cli("optimize", "slowone", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    # Then it names the slow module: the top bottleneck, on the critical path
    assert report["executions"] == 3
    assert report["bottlenecks"][0]["module"] == "slow"
    assert report["critical_path"] == ["start", "slow", "end"]
    assert report["modules"]["slow"]["p50_s"] >= 0.4
    # And the next submission plans with the profile: slow first (learned timeouts only when opted in)
    runtime = hc.cluster.runtime
    profiled = runtime.store.plan(hc.submit(prog).execution_id)
    priority = {name: module.priority for name, module in profiled.modules.items()}
    assert priority["start"] > priority["slow"] > max(priority[f"quick{i}"] for i in range(3))
    assert profiled.modules["slow"].timeout_s is None
    learned = runtime.store.plan(hc.submit(prog, learned_timeouts=True).execution_id)
    assert learned.modules["slow"].timeout_s == report["modules"]["slow"]["recommended_timeout_s"]
    # `run --no-profile` does not
    ran = hc.cli("run", str(write_program(hc, modules)), "--no-profile", "--json")
    assert ran.returncode == 0, ran.stderr
    plain = runtime.store.plan(json.loads(ran.stdout)["execution_id"])
    assert plain.modules["slow"].priority == plain.modules["quick0"].priority and plain.modules["slow"].timeout_s is None


def write_program(hc: HistoryCluster, modules: dict[str, Any]) -> Path:
    path = hc.cluster.tmp / "slowone.json"
    path.write_text(json.dumps({"name": "slowone", "modules": modules}))
    return path


def test_history_on_postgresql(make_cluster, redis_url: str, request: pytest.FixtureRequest) -> None:
    # The same listener and worker, writing to PostgreSQL (a fresh schema of the test database)
    url = request.getfixturevalue("postgres_url")
    cluster = make_cluster()
    cluster.start_worker("default", concurrency=2, pool="threads")
    hcp = HistoryCluster(cluster, url, redis_url)
    hcp.start_listener()
    try:
        result = cluster.run(flaky_program(redis_url))
        assert hcp.recorded(result.execution_id).to_json_dict() == result.to_json_dict()
        assert hcp.attempts(result.execution_id) == EXPECTED_FLAKY
    finally:
        hcp.stop()
        hcp.history.engine.dispose()
