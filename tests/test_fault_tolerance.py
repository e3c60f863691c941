"""Fault tolerance against real workers: retries, timeouts, failure tolerance, lost workers,
program timeouts, resume and cancel."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from typing import Any

import pytest

from dspex_celery import ExecutionStatus, ModuleStatus, UsageError, submit_batch, submit_program
from dspex_celery.defaults import MIN_RETRY_COUNTDOWN_S
from dspex_celery.errors import UnknownExecution
from dspex_celery.results import ExecutionResult, parse_time
from dspex_celery.spec import RetryPolicy
from dspex_celery.runner import backoff_delay
from tests.conftest import Cluster, program, unique, wait_for
from tests.modules.faulty import side_channel

pytestmark = pytest.mark.integration

FAULTY = "tests.modules.faulty"
BASIC = "tests.modules.basic"
STRATEGIES = ["levels", "sequential"]


@pytest.fixture(scope="module")
def cluster(make_cluster) -> Cluster:
    """One prefork worker (time limits and terminate need prefork), three processes."""
    cluster = make_cluster()
    cluster.start_worker("default", concurrency=3)
    return cluster


def new_key(cluster: Cluster, label: str) -> str:
    """A side-channel key inside the cluster's namespace (purged at teardown)."""
    return f"{cluster.settings.namespace}:side:{label}:{uuid.uuid4().hex[:8]}"


def statuses(result: ExecutionResult) -> dict[str, str]:
    return {name: record.status.value for name, record in result.modules.items()}


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# --- retries ----------------------------------------------------------------------------------


def test_flaky_module_retries_with_growing_backoff(cluster: Cluster) -> None:
    # Given a module that fails twice with a TransientError, and a retry policy in `defaults:`
    key = new_key(cluster, "flaky")
    prog = program(unique("flaky"), {"f": {"uses": f"{FAULTY}:flaky", "inputs": {"key": key, "failures": 2}}},
                   defaults={"retry": {"max_attempts": 4, "backoff_s": 0.3, "jitter": False}})
    # When it runs
    result = cluster.run(prog, strategy="levels")
    # Then it succeeds on the third attempt, and the record counts every try
    assert result.status is ExecutionStatus.SUCCEEDED
    assert result.modules["f"].attempts == 3 and result.outputs == {"f": {"calls": 3}}
    # And the pause before each attempt is longer than the one before (exponential backoff)
    attempts = sorted((a for a in cluster.runtime.store.attempts(result.execution_id) if a["module"] == "f"),
                      key=lambda a: a["attempt"])
    assert [a["status"] for a in attempts] == ["retrying", "retrying", "succeeded"]
    gaps = [(parse_time(b["started_at"]) - parse_time(a["finished_at"])).total_seconds()
            for a, b in zip(attempts, attempts[1:], strict=False)]
    assert gaps[0] >= 0.3 * 0.9 and gaps[1] > gaps[0], gaps


def test_an_immediate_retry_waits_until_the_worker_has_reported_it(cluster: Cluster) -> None:
    # Given a module that fails once with a TransientError and a policy without backoff, under levels
    # (the retry goes through Celery's task.retry, which sends the next attempt before its retry event)
    key = new_key(cluster, "immediate")
    prog = program(unique("immediate"), {"f": {"uses": f"{FAULTY}:flaky", "inputs": {"key": key, "failures": 1}}},
                   defaults={"retry": {"max_attempts": 2, "backoff_s": 0}})
    result = cluster.run(prog, strategy="levels")
    assert result.status is ExecutionStatus.SUCCEEDED and result.modules["f"].attempts == 2
    # Then the next attempt starts no sooner than MIN_RETRY_COUNTDOWN_S after the failed one, so Flower's
    # RETRY for the first attempt comes before the second one's SUCCESS
    first, second = sorted((a for a in cluster.runtime.store.attempts(result.execution_id) if a["module"] == "f"),
                           key=lambda a: a["attempt"])
    gap = (parse_time(second["started_at"]) - parse_time(first["finished_at"])).total_seconds()
    assert gap >= MIN_RETRY_COUNTDOWN_S * 0.9, gap


def test_backoff_is_capped_below_the_visibility_timeout() -> None:
    policy = RetryPolicy(backoff_s=1, max_backoff_s=1000, jitter=False)
    assert [backoff_delay(policy, attempt, 3600) for attempt in (1, 2, 3, 4)] == [1, 2, 4, 8]
    assert backoff_delay(policy, 20, visibility_timeout_s=60) == 30  # half the visibility timeout
    jittered = RetryPolicy(backoff_s=1, max_backoff_s=4, jitter=True)
    delays = {backoff_delay(jittered, 5, 3600) for _ in range(200)}
    assert max(delays) <= 4 and len(delays) > 10  # random in 0..cap


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strict_permanent_error_fails_fast(cluster: Cluster, strategy: str) -> None:
    # Given a module raising a permanent error (retries allowed for transient ones), a slow
    # independent sibling and a dependent
    prog = program(unique("strict"), {
        "bad": {"uses": f"{BASIC}:fail", "retry": {"max_attempts": 5, "backoff_s": 0.1}},
        "after": {"uses": f"{BASIC}:inc", "inputs": {"x": 1}, "depends_on": ["bad"]},
        "slow": {"uses": f"{BASIC}:sleep", "inputs": {"seconds": 20}},
    })
    result = cluster.run(prog, strategy=strategy, timeout=30)
    # Then the execution fails on the first attempt, with the module's error
    assert result.status is ExecutionStatus.FAILED
    assert result.modules["bad"].attempts == 1 and result.modules["bad"].error == "ValueError: boom"
    assert result.failed_modules == ["bad"] and result.error == "ValueError: boom"
    # And nothing else ran to the end: the dependent and the slow sibling are cancelled
    assert statuses(result)["after"] == "cancelled"
    assert statuses(result)["slow"] == "cancelled"


# --- failure tolerance ------------------------------------------------------------------------


def tolerant_program(name: str, tolerance: Any, failing: list[str]) -> Any:
    """a -> b -> c; d independent; e -> f; modules in ``failing`` raise."""
    def module(name: str, **keys: Any) -> dict[str, Any]:
        return {"uses": f"{BASIC}:fail" if name in failing else f"{BASIC}:inc", **keys}

    return program(name, {
        "a": module("a", inputs={"x": 1}),
        "b": module("b", inputs={"x": "$a.x"}),
        "c": module("c", inputs={"x": "$b.x"}),
        "d": module("d", inputs={"x": 10}),
        "e": module("e", inputs={"x": 20}),
        "f": module("f", inputs={"x": "$e.x"}),
    }, failure_tolerance=tolerance)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_tolerant_skips_dependents_and_keeps_other_branches(cluster: Cluster, strategy: str) -> None:
    result = cluster.run(tolerant_program(unique("tolerant"), "tolerant", ["a"]), strategy=strategy)
    # Then the execution succeeds with partial outputs and names the failed module
    assert result.status is ExecutionStatus.SUCCEEDED
    assert result.failed_modules == ["a"]
    assert statuses(result) == {"a": "failed", "b": "skipped", "c": "skipped", "d": "succeeded",
                                "e": "succeeded", "f": "succeeded"}
    # And each skipped module says which upstream module stopped it
    assert result.modules["b"].error == "skipped: upstream module 'a' failed"
    assert result.modules["c"].error == "skipped: upstream module 'b' skipped"
    assert result.outputs == {"d": {"x": 11}, "f": {"x": 22}}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_threshold_switches_to_failed_after_n(cluster: Cluster, strategy: str) -> None:
    one = cluster.run(tolerant_program(unique("thr"), {"threshold": 1}, ["a"]), strategy=strategy)
    two = cluster.run(tolerant_program(unique("thr"), {"threshold": 1}, ["a", "d"]), strategy=strategy)
    # One failure is within the threshold: the execution goes on and succeeds
    assert one.status is ExecutionStatus.SUCCEEDED and one.failed_modules == ["a"]
    assert statuses(one)["f"] == "succeeded"
    # The second failure is one too many: the execution fails
    assert two.status is ExecutionStatus.FAILED and sorted(two.failed_modules) == ["a", "d"]


@pytest.mark.parametrize("tolerance", ["strict", "tolerant"])
@pytest.mark.parametrize("strategy", ["levels", "sequential", "dag"])
def test_failure_in_a_wide_level_never_hangs(cluster: Cluster, strategy: str, tolerance: str) -> None:
    # Given 12 parallel modules, one of which fails, and a fan-in after them
    modules: dict[str, Any] = {f"w{i}": {"uses": f"{BASIC}:inc", "inputs": {"x": i}} for i in range(12)}
    modules["w5"] = {"uses": f"{BASIC}:fail"}
    modules["join"] = {"uses": f"{BASIC}:total", "depends_on": sorted(modules)}
    result = cluster.run(program(unique("wide"), modules, failure_tolerance=tolerance), strategy=strategy,
                         timeout=60)
    # Then the client gets an accurate result (cluster.run raises if it does not come)
    assert result.modules["w5"].status is ModuleStatus.FAILED and result.failed_modules == ["w5"]
    assert result.modules["join"].status in (ModuleStatus.SKIPPED, ModuleStatus.CANCELLED)
    expected = ExecutionStatus.FAILED if tolerance == "strict" else ExecutionStatus.SUCCEEDED
    assert result.status is expected
    if tolerance == "tolerant":
        assert all(result.modules[f"w{i}"].status is ModuleStatus.SUCCEEDED for i in range(12) if i != 5)


# --- timeouts ---------------------------------------------------------------------------------


def test_soft_timeout_is_transient_unless_configured(cluster: Cluster) -> None:
    modules = {
        "retried": {"uses": f"{BASIC}:sleep", "inputs": {"seconds": 20}, "timeout_s": 0.5,
                    "retry": {"max_attempts": 2, "backoff_s": 0.05}},
        "not_retried": {"uses": f"{BASIC}:sleep", "inputs": {"seconds": 20}, "timeout_s": 0.5,
                        "retry": {"max_attempts": 2, "backoff_s": 0.05, "timeouts": False}},
    }
    result = cluster.run(program(unique("soft"), modules, failure_tolerance="tolerant"), strategy="levels")
    for name, attempts in (("retried", 2), ("not_retried", 1)):
        record = result.modules[name]
        assert record.status is ModuleStatus.FAILED and record.attempts == attempts, record
        assert record.error.startswith("ModuleTimeout:")


@pytest.mark.parametrize("strategy", ["levels", "dag"])
def test_hard_time_limit_kill_never_leaves_the_execution_hanging(cluster: Cluster, strategy: str) -> None:
    # Given a module that swallows its soft time limit (so the hard limit kills its process),
    # a dependent of it and an independent branch, tolerant
    prog = program(unique("hard"), {
        "stuck": {"uses": f"{FAULTY}:ignores_soft_limit", "timeout_s": 0.5},
        "after": {"uses": f"{BASIC}:inc", "inputs": {"x": 1}, "depends_on": ["stuck"]},
        "other": {"uses": f"{BASIC}:inc", "inputs": {"x": 1}},
        "other2": {"uses": f"{BASIC}:inc", "inputs": {"x": "$other.x"}},
    }, failure_tolerance="tolerant")
    result = cluster.run(prog, strategy=strategy, timeout=60)
    # Then the killed module is failed with a timeout, its dependent skipped, the rest done
    assert result.modules["stuck"].status is ModuleStatus.FAILED
    assert result.modules["stuck"].error.startswith("ModuleTimeout: killed by the hard time limit")
    assert statuses(result)["after"] == "skipped"
    assert result.status is ExecutionStatus.SUCCEEDED and result.outputs["other2"] == {"x": 3}


def test_module_calling_sys_exit_fails_without_killing_the_worker(cluster: Cluster) -> None:
    result = cluster.run(program(unique("exits"), {"e": {"uses": f"{FAULTY}:exits"}}), strategy="levels")
    assert result.status is ExecutionStatus.FAILED
    assert result.modules["e"].attempts == 1 and "raised SystemExit(3)" in result.modules["e"].error


def test_program_timeout_fails_the_execution_and_stops_its_modules(cluster: Cluster) -> None:
    key = new_key(cluster, "timeout")
    prog = program(unique("ptimeout"), {
        "slow": {"uses": f"{FAULTY}:sleeper", "inputs": {"key": key, "seconds": 20}},
        "after": {"uses": f"{BASIC}:inc", "inputs": {"x": 1}, "depends_on": ["slow"]},
    })
    handle = cluster.submit(prog, strategy="levels", timeout=1.5)
    result = handle.get(propagate=False)
    # Then the execution failed as timed out; every unfinished module is cancelled
    assert result.status is ExecutionStatus.FAILED and result.error.startswith("timed out")
    assert statuses(result) == {"slow": "cancelled", "after": "cancelled"}
    # And the running module's process was terminated (it never gets to the end)
    pid = int(side_channel().hget(key, "pid"))
    wait_for(lambda: pid_gone(pid), what=f"pool process {pid} to be terminated")
    assert not side_channel().hexists(key, "done")


def test_workers_end_an_execution_past_its_deadline_without_the_client(cluster: Cluster) -> None:
    # Given a chain of modules and a client that submits with a timeout and goes away
    modules = {f"m{i}": {"uses": f"{BASIC}:sleep", "inputs": {"seconds": 0.4}, **({"depends_on": [f"m{i-1}"]} if i else {})}
               for i in range(6)}
    handle = cluster.submit(program(unique("deadline"), modules), strategy="levels", timeout=1.0)
    # Then the workers themselves end it when the next module or stage starts after the deadline
    wait_for(lambda: handle.status().final, what="the execution to end")
    result = handle.current()
    assert handle.status() is ExecutionStatus.FAILED
    assert any(record.status is ModuleStatus.CANCELLED for record in result.modules.values())
    assert result.modules["m0"].status is ModuleStatus.SUCCEEDED


# --- lost workers -----------------------------------------------------------------------------


def test_killed_pool_process_module_is_rerun_every_time(cluster: Cluster) -> None:
    """kill -9 the pool process running a module, 24 times: a 1-in-10 loss would show (p < 0.08)."""
    batches, parallel = 8, 3  # three executions at once: one per pool process
    for batch in range(batches):
        keys = [new_key(cluster, f"kill{batch}.{index}") for index in range(parallel)]
        handles = [cluster.submit(killed_program(key), strategy="levels") for key in keys]
        pids = []
        for key in keys:
            pid = int(wait_for(lambda key=key: side_channel().lindex(f"{key}:pids", 0), what="a slow module to start"))
            os.kill(pid, signal.SIGKILL)
            pids.append(pid)
        for key, pid, handle in zip(keys, pids, handles, strict=True):
            result = handle.get(timeout=60)
            # Then the module ran again in another process, and the execution completed
            assert result.status is ExecutionStatus.SUCCEEDED, (batch, result.modules)
            assert result.outputs == {"after": {"x": 3}}
            record = result.modules["slow"]
            assert record.attempts == 2 and record.lost_attempts == 1, (batch, record)
            assert int(side_channel().lindex(f"{key}:pids", 1)) != pid


def killed_program(key: str) -> Any:
    return program("killed", {
        "slow": {"uses": f"{FAULTY}:slow_first_call", "inputs": {"key": key, "seconds": 30}},
        "after": {"uses": f"{BASIC}:inc", "inputs": {"x": "$slow.calls"}},
    })


# --- resume -----------------------------------------------------------------------------------


def resume_program(key: str) -> Any:
    """a -> b -> c, and d independent; each counts its calls."""
    def module(name: str, **keys: Any) -> dict[str, Any]:
        return {"uses": f"{FAULTY}:counted", "inputs": {"key": key, "name": name, **keys.pop("inputs", {})}, **keys}

    return program("resumable", {
        "a": module("a", inputs={"value": 1}),
        "b": module("b", inputs={"value": "$a.value"}),
        "c": module("c", inputs={"value": "$b.value"}),
        "d": module("d"),
    }, outputs={"c": "$c.value", "d": "$d.name"})


def test_resume_reruns_only_failed_and_not_run_modules(cluster: Cluster) -> None:
    key = new_key(cluster, "resume")
    redis_side = side_channel()
    prog = resume_program(key)
    # Given an execution that failed at b (c never ran)
    redis_side.sadd(f"{key}:broken", "b")
    first = cluster.run(prog, strategy="levels")
    assert first.status is ExecutionStatus.FAILED and statuses(first)["c"] == "cancelled"
    # When b is fixed (and c breaks) and the execution is resumed through the API
    redis_side.srem(f"{key}:broken", "b")
    redis_side.sadd(f"{key}:broken", "c")
    second = cluster.submit(prog, resume_from=first.execution_id, strategy="levels").get(timeout=60, propagate=False)
    # Then a and d are reused, b ran again, c failed
    assert second.resumed_from == first.execution_id
    assert {name for name, record in second.modules.items() if record.reused} == {"a", "d"}
    assert statuses(second) == {"a": "succeeded", "b": "succeeded", "c": "failed", "d": "succeeded"}
    # When c is fixed and the CLI resumes the second execution
    redis_side.srem(f"{key}:broken", "c")
    cli = cluster.cli("resume", second.execution_id, "--json")
    assert cli.returncode == 0, cli.stderr
    third = json.loads(cli.stdout)
    # Then only c ran; the outputs are complete
    assert third["status"] == "succeeded" and third["resumed_from"] == second.execution_id
    assert {name for name, record in third["modules"].items() if record["reused"]} == {"a", "b", "d"}
    assert third["outputs"] == {"c": 1, "d": "d"}
    # Every module ran exactly as often as it had to
    assert redis_side.hgetall(key) == {"a": "1", "b": "2", "c": "2", "d": "1"}


def test_resume_of_unknown_or_running_execution_is_a_clear_error(cluster: Cluster) -> None:
    cli = cluster.cli("resume", "no-such-execution")
    assert cli.returncode == 2
    assert cli.stderr.strip().startswith("error: cannot resume 'no-such-execution': unknown or expired execution")
    assert "Traceback" not in cli.stderr
    with pytest.raises(UnknownExecution):
        cluster.submit(resume_program("x"), resume_from="no-such-execution")
    key = new_key(cluster, "running")
    running = cluster.submit(program(unique("running"), {"s": {"uses": f"{FAULTY}:sleeper",
                                                                "inputs": {"key": key, "seconds": 20}}}))
    with pytest.raises(UsageError, match="still running"):
        cluster.submit(program(unique("x"), {"s": {"uses": f"{BASIC}:inc"}}), resume_from=running.execution_id)
    running.cancel()


# --- cancel -----------------------------------------------------------------------------------


def test_cancel_ends_quickly_and_leaves_nothing_running(cluster: Cluster) -> None:
    key = new_key(cluster, "cancel")
    prog = program(unique("cancel"), {
        "long": {"uses": f"{FAULTY}:sleeper", "inputs": {"key": key, "seconds": 30}},
        "quick": {"uses": f"{BASIC}:inc", "inputs": {"x": 1}},
        "after": {"uses": f"{BASIC}:inc", "inputs": {"x": 1}, "depends_on": ["long"]},
    })
    handle = cluster.submit(prog, strategy="levels")
    pid = int(wait_for(lambda: side_channel().hget(key, "pid"), what="the long module to start"))
    wait_for(lambda: statuses(handle.current()).get("quick") == "succeeded", what="the quick module to finish")
    # When the execution is cancelled
    started = time.monotonic()
    result = handle.cancel()
    elapsed = time.monotonic() - started
    # Then it is cancelled at once, with an accurate record
    assert result.status is ExecutionStatus.CANCELLED and handle.status() is ExecutionStatus.CANCELLED
    assert statuses(result) == {"long": "cancelled", "quick": "succeeded", "after": "cancelled"}
    assert elapsed < 10  # the long module would have run 30 s
    # And the running module was terminated: its process is gone, it never finishes
    wait_for(lambda: pid_gone(pid), what=f"pool process {pid} to be terminated")

    def nothing_active() -> bool:  # the stage's errback (bookkeeping) may still be finishing
        active = cluster.runtime.app.control.inspect(timeout=2).active() or {}
        return not [task for tasks in active.values() for task in tasks if task["id"].startswith(handle.execution_id)]

    wait_for(nothing_active, timeout=10, what="no task of the execution to be active")
    assert not side_channel().hexists(key, "done")
    # And the worker says in one INFO line that the stage ended by the cancel: no ERROR, no traceback
    line = f"INFO celery.backends.redis: levels stage ended by a revoke (a cancel): Dependency {handle.execution_id}.long"

    def worker_log() -> str | None:
        text = cluster.workers[0].log.read_text(errors="replace")
        return text if line in text else None

    log = wait_for(worker_log, timeout=10, what="the stage's cancel line")
    about_it = [text for text in log.splitlines() if handle.execution_id in text]
    assert not [text for text in about_it if "ERROR" in text or "ChordError" in text], about_it


def test_cancel_on_a_threads_worker_logs_no_error_and_reaches_every_running_module(make_cluster) -> None:
    # Given a threads-pool worker (it cannot stop a running call) running two slow modules at once
    cluster = make_cluster()
    worker = cluster.start_worker("default", concurrency=2, pool="threads")
    keys = [new_key(cluster, f"threads{index}") for index in range(2)]
    handle = cluster.submit(program(unique("threadscancel"), {
        f"long{index}": {"uses": f"{FAULTY}:sleeper", "inputs": {"key": key, "seconds": 4}}
        for index, key in enumerate(keys)}), strategy="dag")
    for key in keys:
        wait_for(lambda key=key: side_channel().hget(key, "pid"), what="both slow modules to start")
    # When the execution is cancelled
    result = handle.cancel()
    # Then it ends cancelled, and the worker says once per running module that it lets the call run out,
    # with no error (Celery's threads pool raises NotImplementedError when asked to terminate a call)
    assert result.status is ExecutionStatus.CANCELLED
    wait_for(lambda: worker.log.read_text(errors="replace").count("cannot stop the running call") == 2,
             timeout=10, what="a line per running module")
    log = worker.log.read_text(errors="replace")
    assert "NotImplementedError" not in log and "pidbox command error" not in log, log[-2000:]
    cluster.stop()


def test_cli_cancel(cluster: Cluster) -> None:
    key = new_key(cluster, "clicancel")
    handle = cluster.submit(program(unique("clicancel"), {
        "long": {"uses": f"{FAULTY}:sleeper", "inputs": {"key": key, "seconds": 30}}}), strategy="levels")
    wait_for(lambda: side_channel().hget(key, "pid"), what="the long module to start")
    cli = cluster.cli("cancel", handle.execution_id)
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.strip() == f"execution {handle.execution_id} cancelled: 1 module(s) cancelled"
    assert handle.get(timeout=10, propagate=False).status is ExecutionStatus.CANCELLED
    again = cluster.cli("cancel", handle.execution_id)
    assert again.returncode == 0 and "already ended: cancelled" in again.stdout
    unknown = cluster.cli("cancel", "nope")
    assert unknown.returncode == 2 and unknown.stderr.strip() == "error: unknown or expired execution 'nope'"


def test_timeout_reaching_the_visibility_timeout_is_refused(redis_url: str) -> None:
    # A module allowed to run past the visibility timeout would be re-delivered and run twice
    from dspex_celery import Settings, create_runtime
    from dspex_celery.errors import ConfigError

    app = create_runtime(Settings(broker_url=redis_url, visibility_timeout_s=60, namespace="vt-check")).app
    prog = program("vt", {"long": {"uses": f"{BASIC}:sleep", "timeout_s": 58}})
    with pytest.raises(ConfigError, match="module 'long': timeout_s 58 s .* visibility timeout \\(60 s\\)"):
        submit_program(prog, {}, app=app)


def test_timeout_outside_prefork_abandons_the_call() -> None:
    # Embedded runs (threads pool, like `-P threads` workers) cannot kill a call: it is abandoned
    from dspex_celery import Settings, create_runtime

    app = create_runtime(Settings(namespace=f"embedded-timeout-{uuid.uuid4().hex[:6]}")).app
    prog = program("embedded_timeout", {"s": {"uses": f"{BASIC}:sleep", "inputs": {"seconds": 10}, "timeout_s": 0.3,
                                              "retry": {"max_attempts": 1}}})
    started = time.monotonic()
    result = submit_program(prog, {}, app=app).get(timeout=30, propagate=False)
    assert result.status is ExecutionStatus.FAILED and time.monotonic() - started < 10
    assert result.modules["s"].error.startswith("ModuleTimeout: module 's' ran longer than its timeout_s (0.3 s)")
    assert "abandoned" in result.modules["s"].error


@pytest.mark.parametrize("strategy", ["dag", "levels"])
def test_worker_dying_while_it_publishes_the_result_still_answers_the_client(make_cluster, strategy: str) -> None:
    # Given the only worker, which dies (no ack, no cleanup) once it has claimed to finish the
    # execution and before it publishes the result
    cluster: Cluster = make_cluster(visibility_timeout_s=2)
    doomed = cluster.start_worker("default", concurrency=1, pool="threads",
                                  extra_args=("--include", "tests.modules.die_after"),
                                  env={"DSPEX_TEST_DIE_IN_FINISH": "1"})
    handle = cluster.submit(program("dies-finishing", {"a": {"uses": "tests.modules.basic:add",
                                                              "inputs": {"a": 1, "b": 2}}}), strategy=strategy)
    assert doomed.process.wait(timeout=30) != 0
    # When the task that was finishing comes back (visibility timeout) to a new worker
    time.sleep(3)
    cluster.start_worker("default", concurrency=1, pool="threads", env={"DSPEX_VISIBILITY_TIMEOUT_S": "2"})
    # Then the client gets the result the dead worker had claimed, and the stored status agrees
    result = handle.get(timeout=60)
    assert result.status is ExecutionStatus.SUCCEEDED
    assert result.outputs == {"a": {"sum": 3}}
    assert cluster.runtime.store.meta(handle.execution_id)["status"] == "succeeded"


@pytest.mark.parametrize("waiter", ["handle", "batch"])
def test_waiting_client_publishes_a_result_whose_finisher_died(make_cluster, waiter: str) -> None:
    # Given the only worker, which dies once it has claimed to finish the execution and before it
    # publishes the result, and no worker to take its task back (the visibility timeout is an hour)
    cluster: Cluster = make_cluster()
    doomed = cluster.start_worker("default", concurrency=1, pool="threads",
                                  extra_args=("--include", "tests.modules.die_after"),
                                  env={"DSPEX_TEST_DIE_IN_FINISH": "1"})
    dying = program("dies-finishing-alone", {"a": {"uses": "tests.modules.basic:add", "inputs": {"a": 1, "b": 2}}})
    # When the client waits for the result, with a handle or as a batch line
    if waiter == "handle":
        handle = cluster.submit(dying, strategy="dag")
        assert doomed.process.wait(timeout=30) != 0
        result = handle.get(timeout=60)
        status, outputs, execution_id = result.status, result.outputs, handle.execution_id
    else:
        [line] = submit_batch(dying, [{}], app=cluster.runtime.app, strategy="dag", timeout=60).as_completed()
        status, outputs, execution_id = ExecutionStatus(line.status), line.outputs, line.execution_id
        assert doomed.process.wait(timeout=30) != 0
    # Then it publishes the claimed result itself, and the stored status agrees
    assert status is ExecutionStatus.SUCCEEDED
    assert outputs == {"a": {"sum": 3}}
    assert cluster.runtime.store.meta(execution_id)["status"] == "succeeded"


#: A short visibility timeout, so that recovery from a dead worker is quick to test.
SHORT_VISIBILITY_S = 8


def test_whole_worker_killed_its_module_reruns_elsewhere_within_1_5_visibility_timeouts(make_cluster) -> None:
    # Given a module running on a worker, another worker of its class, and a short visibility timeout
    cluster: Cluster = make_cluster(visibility_timeout_s=SHORT_VISIBILITY_S)
    env = {"DSPEX_VISIBILITY_TIMEOUT_S": str(SHORT_VISIBILITY_S)}
    doomed = cluster.start_worker("default", concurrency=1, env=env)
    key = new_key(cluster, "dead-worker")
    handle = cluster.submit(killed_program(key), strategy="dag")
    first = int(wait_for(lambda: side_channel().lindex(f"{key}:pids", 0), what="the slow module to start"))
    assert first in doomed.pool_pids()
    survivor = cluster.start_worker("default", concurrency=1, env=env)
    # When the whole worker is killed: its main process and its pool process
    for pid in [doomed.process.pid, *doomed.pool_pids()]:
        os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    doomed.process.wait(timeout=10)
    # Then the module runs again on the other worker within 1.5 x the visibility timeout
    second = int(wait_for(lambda: side_channel().lindex(f"{key}:pids", 1), timeout=3 * SHORT_VISIBILITY_S,
                          what="the module to run again"))
    elapsed = time.monotonic() - killed
    assert elapsed <= 1.5 * SHORT_VISIBILITY_S, elapsed
    assert second in survivor.pool_pids()
    result = handle.get(timeout=30)
    assert result.status is ExecutionStatus.SUCCEEDED and result.outputs == {"after": {"x": 3}}
    record = result.modules["slow"]
    assert record.attempts == 2 and record.lost_attempts == 1 and record.worker.startswith(survivor.name), record
