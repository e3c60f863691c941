"""The history listener survives a Redis restart without persistence: it recreates its consumer
group, reconciles, and records the executions that follow, with one warning and no traceback."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import threading
from pathlib import Path

import pytest
import yaml

from dspex_celery.bootstrap import create_runtime
from dspex_celery.history.hooks import stream_key
from dspex_celery.history.listener import Listener
from dspex_celery.history.store import HistoryStore
from tests.conftest import CLI, ROOT, Cluster, RedisServer, new_settings, wait_for

pytestmark = pytest.mark.integration


def run_program(cluster: Cluster, path: Path) -> str:
    """Run the program through the CLI (a fresh client each time); its execution id."""
    done = cluster.cli("run", str(path), "--json", "--timeout", "60", timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    return str(json.loads(done.stdout)["execution_id"])


def test_listener_recreates_its_group_after_a_redis_restart(
    make_cluster, own_redis: RedisServer, tmp_path: Path
) -> None:
    # Given a worker and a listener on a Redis of this test's own, and one execution recorded
    cluster: Cluster = make_cluster(broker_url=own_redis.url(0))
    cluster.start_worker(concurrency=2, pool="threads")
    url = f"sqlite:///{tmp_path / 'history.db'}"
    log = tmp_path / "listener.log"
    listener = subprocess.Popen([CLI, "listener"], cwd=ROOT, env=cluster.env(DSPEX_HISTORY_URL=url),
                                stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "listener ready" in log.read_text(), 30, lambda: f"listener not ready:\n{log.read_text()}")
        history = HistoryStore(url, create=False)
        path = tmp_path / "p.yaml"
        path.write_text(yaml.safe_dump({"name": "restarted", "modules": {
            "a": {"uses": "tests.modules.basic:add", "inputs": {"a": 1, "b": 2}},
            "b": {"uses": "tests.modules.basic:add", "inputs": {"a": "$a.sum", "b": 1}}}}))
        before = run_program(cluster, path)
        wait_for(lambda: history.final_ids([before]), 30, "the first execution in history")
        # When Redis shuts down without saving (the stream and its consumer group are gone) and comes back
        quiet = len(log.read_text())
        own_redis.shutdown_nosave()
        wait_for(lambda: len(log.read_text()) > quiet, 15, "the listener to notice")  # mid-outage, before restart
        own_redis.start()
        after = run_program(cluster, path)
        # Then the next execution is recorded in history, as `history --json` shows
        wait_for(lambda: history.final_ids([after]), 30,
                 lambda: f"execution {after} not in history; listener log:\n{log.read_text()}")
        listed = cluster.cli("history", "--json", env={"DSPEX_HISTORY_URL": url})
        assert {item["execution_id"]: item["status"] for item in json.loads(listed.stdout)} == {
            before: "succeeded", after: "succeeded"}
        # And the consumer group exists again
        groups = own_redis.client().xinfo_groups(stream_key(cluster.settings.namespace))
        assert [group["name"] for group in groups] == [b"history"]
    finally:
        listener.send_signal(signal.SIGTERM)
        listener.wait(timeout=15)
        cluster.stop()  # while its Redis still runs
    # And the listener said so in one warning, then how it recovered; no traceback
    text = log.read_text()
    assert "Traceback" not in text and "NOGROUP" not in text, text
    warnings = [line for line in text.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and "cannot reach Redis at redis://127.0.0.1:" in warnings[0], text
    assert "consumer group 'history' recreated" in text, text
    assert listener.returncode == 0, text


def test_listener_rejoins_a_group_lost_between_two_polls(redis_url: str, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    # Given a listener that joined its group (a namespace of this test's own on the suite's Redis)
    runtime = create_runtime(new_settings(redis_url))
    listener = Listener(runtime, HistoryStore(f"sqlite:///{tmp_path / 'h.db'}"), block_ms=100)
    listener.start()
    stop = threading.Event()
    thread = threading.Thread(target=listener.run, args=(stop,), daemon=True)
    thread.start()
    try:
        # When the stream and its group vanish without the connection dropping (a fast restart)
        client = runtime.store.client
        client.delete(listener.stream)
        # Then the listener recreates the group, with one warning and no error
        wait_for(lambda: client.exists(listener.stream) and client.xinfo_groups(listener.stream), 15,
                 "the consumer group to be recreated")
    finally:
        stop.set()
        thread.join(timeout=10)
        runtime.store.client.delete(listener.stream)
    problems = [(record.levelname, record.getMessage()) for record in caplog.records if record.levelno >= logging.WARNING]
    assert len(problems) == 1 and problems[0][0] == "WARNING", problems
    assert "consumer group 'history' of" in problems[0][1] and "is gone" in problems[0][1]


def test_executions_whose_state_redis_lost_are_ended_in_history(redis_url: str, tmp_path: Path) -> None:
    # Given a listener that recorded a running module of an execution (a namespace of this test's own)
    from dspex_celery.history.events import RecordEvent
    from dspex_celery.program import Program
    from dspex_celery.results import ModuleRecord, ModuleStatus

    runtime = create_runtime(new_settings(redis_url))
    history = HistoryStore(f"sqlite:///{tmp_path / 'h.db'}")
    listener = Listener(runtime, history, block_ms=100)
    listener.start()
    plan = Program.from_dict({"name": "lost", "modules": {"m": {"uses": "tests.modules.basic:add"}}}).plan()
    store, client = runtime.store, runtime.store.client
    for execution_id in ("gone", "kept"):
        store.create(execution_id, plan, {"strategy": "dag", "program": "lost"})
        listener.write([RecordEvent(execution_id, "m", ModuleRecord(status=ModuleStatus.RUNNING, attempts=1))])
    assert history.execution("gone").status == "running"
    stop = threading.Event()
    thread = threading.Thread(target=listener.run, args=(stop,), daemon=True)
    thread.start()
    try:
        # When Redis loses the stream, its group and one execution's state (a restart without persistence)
        client.delete(listener.stream, *client.keys(store.key("gone", "*")))
        wait_for(lambda: history.final_ids(["gone"]), 15, "the lost execution to be ended in history")
    finally:
        stop.set()
        thread.join(timeout=10)
        client.delete(listener.stream, *client.keys(store.key("kept", "*")))
    # Then it ended failed, saying why, its running attempt lost; the execution still in the store is left open
    row = history.execution("gone")
    assert row.status == "failed" and "its state is gone" in (row.error or "")
    assert history.execution("kept").status == "running"
    assert [attempt.status for attempt in history.attempts(["gone"])] == ["lost"]
