"""Waiting on an execution from the client: ``get`` raising, Ctrl-C on ``run``, ``run --detach``, and a
state store that loses the execution (Redis restarted without persistence) or stops answering."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from dspex_celery import ExecutionFailed, ExecutionHandle, ExecutionStatus, ModuleStatus, Settings
from tests.conftest import CLI, ROOT, TEST_MODULES, Cluster, RedisServer, cli_env, new_settings, program, wait_for

pytestmark = pytest.mark.integration

BASIC = "tests.modules.basic"


@pytest.fixture(scope="module")
def cluster(make_cluster) -> Cluster:
    """One prefork worker (cancel terminates running modules in prefork pools)."""
    cluster = make_cluster()
    cluster.start_worker("default", concurrency=2)
    return cluster


def sleepy_program(directory: Path, seconds: float) -> Path:
    """A program file: ``first`` sleeps, ``second`` depends on it."""
    path = directory / f"sleepy-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump({
        "name": "sleepy",
        "modules": {
            "first": {"uses": f"{BASIC}:sleep", "inputs": {"seconds": seconds, "value": 1}},
            "second": {"uses": f"{BASIC}:echo", "inputs": {"v": "$first.value"}},
        },
        "outputs": {"v": "$second.v"},
    }))
    return path


def start_run(cluster: Cluster, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([CLI, "run", *args], cwd=ROOT, env=cluster.env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def running_execution(cluster: Cluster, module: str = "first") -> str:
    """The id of the cluster's one live execution, once ``module`` runs."""
    store = cluster.runtime.store

    def found() -> str | None:
        for execution_id in store.live_executions():
            if store.record(execution_id, module).status is ModuleStatus.RUNNING:
                return execution_id
        return None

    return str(wait_for(found, timeout=30, what=f"module '{module}' to run"))


# --- get() ------------------------------------------------------------------------------------------


def test_get_raises_for_a_failed_execution_unless_told_not_to(cluster: Cluster) -> None:
    # Given an execution whose only module fails
    handle = cluster.submit(program("failing", {"bad": {"uses": f"{BASIC}:fail", "retry": {"max_attempts": 1}}}))
    # When the result is awaited, it raises ExecutionFailed carrying the result
    with pytest.raises(ExecutionFailed, match=r"program 'failing' failed \(execution \w+\): module 'bad': ValueError: boom"
                       ) as raised:
        handle.get(timeout=60)
    assert raised.value.result.status is ExecutionStatus.FAILED and raised.value.result.failed_modules == ["bad"]
    # And propagate=False returns that same result
    assert handle.get(timeout=10, propagate=False) == raised.value.result


def test_get_raises_for_a_cancelled_execution(cluster: Cluster) -> None:
    handle = cluster.submit(program("cancelled", {"s": {"uses": f"{BASIC}:sleep", "inputs": {"seconds": 30}}}))
    assert handle.cancel().status is ExecutionStatus.CANCELLED
    with pytest.raises(ExecutionFailed) as raised:
        handle.get(timeout=10)
    assert raised.value.result.status is ExecutionStatus.CANCELLED


# --- Ctrl-C and --detach on `run` -------------------------------------------------------------------


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_ctrl_c_on_run_cancels_the_execution(cluster: Cluster, tmp_path: Path, as_json: bool) -> None:
    # Given `run` waiting on a program whose first module sleeps and whose second depends on it
    run = start_run(cluster, str(sleepy_program(tmp_path, 4)), *(["--json"] if as_json else []))
    execution_id = running_execution(cluster)
    # When it gets SIGINT (Ctrl-C)
    run.send_signal(signal.SIGINT)
    out, err = run.communicate(timeout=30)
    # Then it cancelled the execution, said so, and exited 130 without a traceback
    assert run.returncode == 130, (out, err)
    assert f"cancelled execution {execution_id}" in err and "Traceback" not in err + out
    if as_json:
        assert json.loads(out)["status"] == "cancelled"
    # And the dependent module never starts, even after the first one would have finished
    time.sleep(5)
    records = cluster.runtime.store.records(execution_id)
    assert records["second"].status is ModuleStatus.CANCELLED and records["second"].attempts == 0
    assert records["first"].status is ModuleStatus.CANCELLED
    assert "second" not in [entry["module"] for entry in cluster.runtime.store.attempts(execution_id)]
    assert ExecutionHandle(cluster.runtime, execution_id).status() is ExecutionStatus.CANCELLED


def test_a_second_ctrl_c_leaves_at_once(own_cluster: Cluster, own_redis: RedisServer, tmp_path: Path) -> None:
    # Given `run` waiting, and a Redis that hangs (stopped), so that cancelling cannot finish
    run = start_run(own_cluster, str(sleepy_program(tmp_path, 6)))
    execution_id = running_execution(own_cluster)
    assert own_redis.process is not None
    own_redis.process.send_signal(signal.SIGSTOP)
    try:
        # When Ctrl-C is pressed, the client tries to cancel and waits for Redis
        run.send_signal(signal.SIGINT)
        time.sleep(1.5)
        assert run.poll() is None
        # Then a second Ctrl-C leaves at once, exit 130, without a traceback
        run.send_signal(signal.SIGINT)
        out, err = run.communicate(timeout=5)
    finally:
        own_redis.process.send_signal(signal.SIGCONT)
    assert run.returncode == 130, (out, err)
    assert err.strip() == "interrupted again: leaving now" and out == ""
    assert ExecutionHandle(own_cluster.runtime, execution_id).status() is ExecutionStatus.RUNNING


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_detach_prints_the_id_and_leaves_it_running(cluster: Cluster, tmp_path: Path, as_json: bool) -> None:
    started = time.monotonic()
    done = cluster.cli("run", str(sleepy_program(tmp_path, 8)), "--detach", *(["--json"] if as_json else []))
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 8  # it did not wait for the 8 s module
    execution_id = json.loads(done.stdout)["execution_id"] if as_json else done.stdout.strip()
    result = ExecutionHandle(cluster.runtime, execution_id).get(timeout=60)
    assert result.status is ExecutionStatus.SUCCEEDED and result.outputs == {"v": 1}


def test_detach_needs_a_cluster(tmp_path: Path) -> None:
    embedded = Settings(namespace=f"detach{uuid.uuid4().hex[:6]}", modules=TEST_MODULES)
    done = subprocess.run([CLI, "run", str(sleepy_program(tmp_path, 0)), "--detach"], cwd=ROOT, text=True,
                          capture_output=True, env=cli_env(embedded))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().startswith("error: --detach needs a cluster")


# --- the state store goes away ----------------------------------------------------------------------


@pytest.fixture
def own_cluster(own_redis: RedisServer, tmp_path: Path) -> Iterator[Cluster]:
    """A cluster whose broker and state store are a Redis of this test's own (to shut down)."""
    cluster = Cluster(new_settings(own_redis.url()), tmp_path)
    cluster.start_worker("default", concurrency=2)
    yield cluster
    for worker in cluster.workers:
        worker.stop()


def stderr_lines(text: str) -> list[str]:
    """stderr without the warning a restarted Redis gives (workers announce themselves every 10 s)."""
    return [line for line in text.splitlines() if line and not line.startswith("warning: no live worker")]


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_redis_restarted_without_persistence_is_one_line(own_cluster: Cluster, own_redis: RedisServer,
                                                         tmp_path: Path, as_json: bool) -> None:
    # Given `run` waiting (no --timeout) on a program whose first module runs for 6 s
    run = start_run(own_cluster, str(sleepy_program(tmp_path, 6)), *(["--json"] if as_json else []))
    execution_id = running_execution(own_cluster)
    # When Redis shuts down without saving mid-run and comes back empty
    own_redis.shutdown_nosave()
    time.sleep(1)
    own_redis.start()
    restarted = time.monotonic()
    out, err = run.communicate(timeout=60)
    # Then the client says so in one line within 10 s, exit 1, no traceback
    assert time.monotonic() - restarted < 10
    line = f"execution {execution_id}: its state is gone (Redis restarted without persistence?)"
    assert run.returncode == 1, (out, err)
    assert stderr_lines(err) == [f"error: {line}"]
    if as_json:
        assert json.loads(out) == {"execution_id": execution_id, "status": "lost", "error": line}
    else:
        assert out == ""


@pytest.mark.parametrize("strategy", ["levels", "dag"])
def test_workers_publish_no_result_made_up_from_lost_state(own_cluster: Cluster, own_redis: RedisServer,
                                                           strategy: str) -> None:
    # Given a strict execution whose module times out (fails) after Redis restarted without its data (6 s:
    # the restart must be over first, or the failed record goes to the Redis that is about to lose it)
    handle = own_cluster.submit(program(f"lost_{strategy}", {
        "first": {"uses": f"{BASIC}:sleep", "inputs": {"seconds": 10}, "timeout_s": 6, "retry": {"max_attempts": 1}},
        "other": {"uses": f"{BASIC}:sleep", "inputs": {"seconds": 10}},
    }), strategy=strategy)
    running_execution(own_cluster)
    own_redis.shutdown_nosave()
    own_redis.start()
    # When the worker fails the execution from what is left (the plan it cached)
    wait_for(lambda: own_redis.client().hget(own_cluster.runtime.store.key(handle.execution_id, "rec"), "first"),
             timeout=30, what=lambda: "the failed record; the worker's log ends:\n"
             + own_cluster.workers[0].log.read_text(errors="replace")[-4000:])
    time.sleep(2)
    # Then it published no result (one that would call every other module "cancelled", 0 attempts)
    assert own_redis.client().exists(f"celery-task-meta-{handle.execution_id}") == 0


def test_redis_restarted_with_its_data_is_waited_out(own_cluster: Cluster, own_redis: RedisServer,
                                                     tmp_path: Path) -> None:
    # Given `run --json` waiting on a program whose first module runs for 5 s
    run = start_run(own_cluster, str(sleepy_program(tmp_path, 5)), "--json")
    execution_id = running_execution(own_cluster)
    # When Redis restarts with its data (SHUTDOWN SAVE, then started again on the dump)
    own_redis.client().shutdown(save=True)
    assert own_redis.process is not None and own_redis.process.wait(timeout=10) == 0
    time.sleep(1)
    own_redis.start()
    out, err = run.communicate(timeout=90)
    # Then the execution completes and its records keep what ran (nothing rewritten as cancelled)
    assert run.returncode == 0, (out, err)
    result = json.loads(out)
    assert result["execution_id"] == execution_id and result["status"] == "succeeded"
    assert {name: (record["status"], record["attempts"]) for name, record in result["modules"].items()} == {
        "first": ("succeeded", 1), "second": ("succeeded", 1)}
    assert "Traceback" not in err


def test_redis_gone_for_good_is_one_line(own_cluster: Cluster, own_redis: RedisServer, tmp_path: Path) -> None:
    # Given `run` waiting on a running execution
    run = start_run(own_cluster, str(sleepy_program(tmp_path, 6)))
    execution_id = running_execution(own_cluster)
    # When Redis goes away and does not come back
    own_redis.shutdown_nosave()
    gone = time.monotonic()
    out, err = run.communicate(timeout=90)
    # Then, after trying for 30 s, the client says so in one line (no traceback) and exits 1
    assert 25 < time.monotonic() - gone < 45
    assert run.returncode == 1 and out == ""
    [line] = stderr_lines(err)
    assert line.startswith(f"error: execution {execution_id}: the state store (result backend) does not answer")
    assert line.endswith(f"check it later with dspex-celery show {execution_id}")


def test_a_snapshot_of_an_ended_execution_keeps_its_own_finish_time(cluster: Cluster) -> None:
    # Given an execution that ended
    handle = cluster.submit(program("ended", {"a": {"uses": f"{BASIC}:inc", "inputs": {"x": 1}}}))
    result = handle.get(timeout=60)
    # When its snapshot is taken a while later
    time.sleep(1.1)
    # Then it says when the execution finished, not when the snapshot was taken
    assert handle.current().finished_at == result.finished_at
