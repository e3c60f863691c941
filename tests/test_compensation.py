"""Compensation on real prefork workers: an execution that fails (strict, over its threshold) or is
cancelled undoes its succeeded modules' side effects in reverse order, exactly once per success, also
when a worker dies during a compensation; `dspex-celery compensate` runs the failed ones again."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from dspex_celery import ExecutionStatus, ModuleStatus
from dspex_celery.canvas import compensate_signature
from dspex_celery.cli import cli
from dspex_celery.compensation_store import records as compensation_records
from dspex_celery.errors import ProgramError
from dspex_celery.client import ExecutionHandle
from dspex_celery.history.store import HistoryStore
from dspex_celery.report import load_report, render_html
from dspex_celery.results import CompensationRecord, CompensationStatus
from tests.conftest import Cluster, program, wait_for

MODS = "tests.modules.compensation_mods"


@pytest.fixture(scope="module")
def cluster(make_cluster) -> Cluster:
    """A prefork worker of two processes: a compensation whose process is killed runs again in another."""
    cluster = make_cluster()
    cluster.start_worker("default", concurrency=2)
    return cluster


def module(name: str, log: Path, uses: str = "step", undo: str | None = "undo", keys: dict[str, Any] | None = None,
           **inputs: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"uses": f"{MODS}:{uses}", "inputs": {"name": name, "log": str(log), **inputs},
                            **(keys or {})}
    if undo is not None:
        spec["compensate"] = f"{MODS}:{undo}"
    return spec


def chain_program(log: Path, last: str = "boom", first_undo: str = "undo", **keys: Any) -> Any:
    """a -> b -> c: a and b have side effects to undo, c (``last``) fails by default."""
    return program("saga", {
        "a": module("a", log, undo=first_undo, value=0, keys={"retry": {"max_attempts": 2, "backoff_s": 0}}),
        "b": module("b", log, value="$a.value"),
        "c": module("c", log, uses=last, undo=None, value="$b.value"),
    }, **keys)


def compensate(cluster: Cluster, *args: str) -> Result:
    """`dspex-celery compensate ARGS` in-process against the cluster."""
    return CliRunner().invoke(cli, ["compensate", *args], env=cluster.env())


def result_plan(cluster: Cluster, execution_id: str) -> Any:
    plan = cluster.runtime.store.plan(execution_id)
    assert plan is not None
    return plan


def lines(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


def settled(cluster: Cluster, execution_id: str, count: int) -> dict[str, CompensationRecord]:
    """The execution's compensations once ``count`` of them have ended (succeeded or failed)."""
    def ended() -> dict[str, CompensationRecord] | None:
        found = compensation_records(cluster.runtime.store, execution_id)
        done = [r for r in found.values() if r.status in (CompensationStatus.SUCCEEDED, CompensationStatus.FAILED)]
        return found if len(done) >= count else None
    return wait_for(ended, timeout=30, what="the compensations to end")


def test_strict_failure_compensates_in_reverse_order_exactly_once(cluster: Cluster, tmp_path: Path) -> None:
    # Given a strict program whose third module fails after two with side effects
    log = tmp_path / "effects.log"
    result = cluster.run(chain_program(log))
    assert result.status is ExecutionStatus.FAILED and result.failed_modules == ["c"]
    # Then the published result lists the compensations to come, children first
    assert list(result.compensations) == ["b", "a"]
    found = settled(cluster, result.execution_id, 2)
    # And each ran once, on its module's inputs and output, in reverse order
    assert lines(log) == ["do:a", "do:b", "undo:b:2", "undo:a:1"]
    assert all(r.status is CompensationStatus.SUCCEEDED and r.attempts == 1 for r in found.values()), found
    # When each compensation is sent again (a second trigger, a re-delivery), its task waited for
    for name in ("b", "a"):
        again = compensate_signature(cluster.runtime.app, result_plan(cluster, result.execution_id),
                                     result.execution_id, [name], cluster.settings.namespace, "again")
        assert again.apply_async(ignore_result=False).get(timeout=20) == {"module": name, "status": "succeeded"}
    # Then no succeeded compensation ran again
    assert lines(log) == ["do:a", "do:b", "undo:b:2", "undo:a:1"]
    assert ExecutionHandle(cluster.runtime, result.execution_id).current().compensations == found
    # And the HTML report lists them
    html = render_html(load_report(cluster.runtime, result.execution_id))
    section = html.split('<table id="compensations">')[1].split("</table>")[0]
    assert section.count('<td class="status-succeeded">succeeded</td>') == 2
    assert section.index("<td>b</td>") < section.index("<td>a</td>")


def test_history_and_show_record_the_compensations(cluster: Cluster, tmp_path: Path) -> None:
    # Given a listener writing this cluster's history
    url = f"sqlite:///{tmp_path / 'history.db'}"
    cluster.start_listener(url)
    result = cluster.run(chain_program(tmp_path / "effects.log"))
    # Then history ends up with both compensations succeeded, and `show --json` prints them
    history = HistoryStore(url)

    def compensated() -> dict[str, CompensationRecord] | None:
        if not history.final_ids([result.execution_id]):  # not written yet
            return None
        found = history.result(result.execution_id).compensations
        return found if found and all(r.status is CompensationStatus.SUCCEEDED for r in found.values()) else None
    recorded = wait_for(compensated, timeout=30, what="the compensations in history")
    assert list(recorded) == ["b", "a"]
    shown = CliRunner().invoke(cli, ["show", result.execution_id, "--json"], env={"DSPEX_HISTORY_URL": url})
    assert shown.exit_code == 0, shown.output
    assert {name: r["status"] for name, r in json.loads(shown.stdout)["compensations"].items()} == {
        "b": "succeeded", "a": "succeeded"}
    human = CliRunner().invoke(cli, ["show", result.execution_id], env={"DSPEX_HISTORY_URL": url})
    assert "compensation of" in human.stdout and human.stdout.count("succeeded") >= 4, human.stdout


def test_a_dspy_module_compensates_with_its_own_method(cluster: Cluster, tmp_path: Path) -> None:
    # Given a dspy.Module (with: prefix) whose compensation is its method undo
    log = tmp_path / "effects.log"
    indexer = {"uses": "tests.modules.compensation_dspy_mods:Indexer", "with": {"prefix": "doc-"},
               "compensate": "undo", "inputs": {"name": "a", "log": str(log), "value": 0}}
    result = cluster.run(program("dspy_saga", {"a": indexer, "c": module("c", log, uses="boom", undo=None,
                                                                           value="$a.value")}))
    # Then the method of the module's instance undid it
    assert settled(cluster, result.execution_id, 1)["a"].status is CompensationStatus.SUCCEEDED
    assert lines(log) == ["do:doc-a", "undo:doc-a:1"]


def test_worker_killed_during_a_compensation_runs_it_again_once(cluster: Cluster, tmp_path: Path) -> None:
    # Given a failing execution whose first module's compensation blocks on its first call
    log = tmp_path / "effects.log"
    handle = cluster.submit(chain_program(log, first_undo="blocking_undo"))
    block = tmp_path / "effects.log.block"
    pid = int(wait_for(lambda: block.exists() and block.read_text(), timeout=30, what="the compensation to block"))
    # When its pool process is killed (kill -9) mid-compensation
    os.kill(pid, signal.SIGKILL)
    found = settled(cluster, handle.execution_id, 2)
    # Then it is re-delivered and runs again in another process, and each compensation happened once
    assert lines(log) == ["do:a", "do:b", "undo:b:2", "undo:a:1"]
    assert found["a"].status is CompensationStatus.SUCCEEDED, found
    assert (found["a"].attempts, found["a"].lost_attempts) == (2, 1), found
    assert found["b"].attempts == 1


def test_cancelled_execution_compensates_what_succeeded(cluster: Cluster, tmp_path: Path) -> None:
    # Given an execution whose second module takes long
    log = tmp_path / "effects.log"
    handle = cluster.submit(program("slow", {
        "a": module("a", log, value=0),
        "b": module("b", log, value="$a.value", seconds=30),
    }))
    wait_for(lambda: "do:a" in lines(log), timeout=30, what="module a to run")
    # While it runs, compensate refuses in one line
    running = compensate(cluster, handle.execution_id)
    assert running.exit_code == 2 and "still running" in running.stderr, running.stderr
    # When it is cancelled
    result = handle.cancel()
    assert result.modules["b"].status is ModuleStatus.CANCELLED
    found = settled(cluster, handle.execution_id, 1)
    # Then the module that succeeded is undone, the cancelled one is not
    assert list(found) == ["a"] and found["a"].status is CompensationStatus.SUCCEEDED
    assert lines(log) == ["do:a", "undo:a:1"]


@pytest.mark.parametrize("tolerance", ["tolerant", {"threshold": 1}])
def test_failures_within_the_tolerance_compensate_nothing(cluster: Cluster, tmp_path: Path, tolerance: Any) -> None:
    log = tmp_path / "effects.log"
    result = cluster.run(chain_program(log, failure_tolerance=tolerance))
    assert result.status is ExecutionStatus.SUCCEEDED and result.failed_modules == ["c"]
    # (records are written before the result is published: none now means none ever)
    assert result.compensations == {} and compensation_records(cluster.runtime.store, result.execution_id) == {}
    assert lines(log) == ["do:a", "do:b"]


def test_failures_over_the_threshold_compensate(cluster: Cluster, tmp_path: Path) -> None:
    log = tmp_path / "effects.log"
    two_fail = program("over", {
        "a": module("a", log, value=0),
        "x": module("x", log, uses="boom", undo=None),
        "y": module("y", log, uses="boom", undo=None, value="$a.value"),
    }, failure_tolerance={"threshold": 1})
    result = cluster.run(two_fail)
    assert result.status is ExecutionStatus.FAILED
    assert settled(cluster, result.execution_id, 1)["a"].status is CompensationStatus.SUCCEEDED
    assert lines(log) == ["do:a", "undo:a:1"]


def test_failed_compensation_is_recorded_and_the_cli_runs_only_it_again(cluster: Cluster, tmp_path: Path) -> None:
    # Given a compensation that fails on both attempts its module's retry policy allows
    log = tmp_path / "effects.log"
    broken = tmp_path / "effects.log.broken"
    broken.touch()
    result = cluster.run(chain_program(log, first_undo="fragile_undo"))
    found = settled(cluster, result.execution_id, 2)
    assert found["a"].status is CompensationStatus.FAILED and found["a"].attempts == 2, found
    assert "RuntimeError: the index of a is unavailable" in (found["a"].error or "")
    assert found["b"].status is CompensationStatus.SUCCEEDED
    assert lines(log) == ["do:a", "do:b", "undo:b:2", "fail:a", "fail:a"]
    # When it can succeed and `dspex-celery compensate ID` runs
    broken.unlink()
    rerun = compensate(cluster, result.execution_id, "--json")
    assert rerun.exit_code == 0, rerun.output
    summary = json.loads(rerun.stdout)
    # Then only the failed one ran again, and succeeded
    assert summary["rerun"] == ["a"] and summary["compensations"]["a"]["status"] == "succeeded"
    assert lines(log) == ["do:a", "do:b", "undo:b:2", "fail:a", "fail:a", "undo:a:1"]
    # And a second run has nothing left to do
    again = compensate(cluster, result.execution_id)
    assert again.exit_code == 0 and "no failed compensation" in again.stdout, again.output


def test_compensate_of_an_unknown_execution_is_one_line(cluster: Cluster) -> None:
    unknown = compensate(cluster, "no-such-execution")
    assert unknown.exit_code == 2
    assert unknown.stderr.strip().splitlines() == [
        "error: no execution 'no-such-execution' in the state store (unknown or expired)"], unknown.stderr


@pytest.mark.parametrize(("undo", "problem"), [
    (f"{MODS}:wrong_signature", "must take the keywords inputs and output"),
    (f"{MODS}:missing", "cannot be resolved"),
    ("undo", "uses 'tests.modules.compensation_mods:step' is not a class with a method 'undo'"),
    ("not a name", "expected 'package.module:function' or the name of a method"),
])
def test_a_bad_compensate_is_one_line_at_plan_time(tmp_path: Path, undo: str, problem: str) -> None:
    with pytest.raises(ProgramError) as raised:
        program("bad", {"a": {**module("a", tmp_path / "log", undo=None), "compensate": undo}}).plan()
    assert len(raised.value.problems) == 1 and problem in raised.value.problems[0], raised.value.problems


def test_compensate_is_part_of_the_fingerprint(tmp_path: Path) -> None:
    with_undo = program("p", {"a": module("a", tmp_path / "log")}).plan()
    without = program("p", {"a": module("a", tmp_path / "log", undo=None)}).plan()
    assert with_undo.fingerprint != without.fingerprint
    assert with_undo.modules["a"].compensate == f"{MODS}:undo"


@pytest.mark.parametrize("method", ["__class__", "__init_subclass__", "__call__"])
def test_a_forged_compensate_method_name_is_refused(method: str) -> None:
    # Given a plan (anyone with queue access can forge one) whose class module names a dunder as compensate
    import dataclasses

    from dspex_celery.compensation import load_compensation
    from dspex_celery.errors import ModuleNotAllowed

    plan = program("forged", {"scale": {"uses": "tests.modules.basic:Scaler", "inputs": {"x": 1}}}).plan()
    forged = dataclasses.replace(plan.modules["scale"], compensate=method)
    # When a worker loads its compensation, then it refuses: a method is looked up as `uses` paths are
    with pytest.raises(ModuleNotAllowed, match=f"compensate '{method}' is refused"):
        load_compensation(forged, ("tests.modules",))
