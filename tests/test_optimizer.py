"""The optimizer on a synthetic history: exact percentiles, critical path, bottlenecks, advice, profiles."""

from __future__ import annotations

from datetime import timedelta

import pytest

from dspex_celery import (
    ExecutionResult,
    ExecutionStatus,
    ModuleRecord,
    ModuleStatus,
    Settings,
)
from dspex_celery.history.events import Event, ExecutionInfo, FinishedEvent, RecordEvent
from dspex_celery.history.store import HistoryStore
from dspex_celery.optimizer import (
    analyze,
    apply_profile,
    learned_timeout,
    optimize,
    percentile,
)
from dspex_celery.plan import Plan
from dspex_celery.program import Program
from dspex_celery.results import isoformat, utcnow
from tests.conftest import program, wait_for

NOOP = "tests.modules.basic:echo"
T0 = utcnow()

#  s --> a --> t
#   \--> b --/      b retries in two runs; t fails in the last run
DIAMOND = program(
    "diamond",
    {
        "s": {"uses": NOOP},
        "a": {"uses": NOOP, "depends_on": ["s"]},
        "b": {"uses": NOOP, "depends_on": ["s"], "retry": {"max_attempts": 2}},
        "t": {"uses": NOOP, "depends_on": ["a", "b"], "timeout_s": 9.0},
    },
)
DURATIONS = {  # seconds of the successful attempt, per execution
    "s": [0.1, 0.2, 0.3, 0.4, 0.5],
    "a": [5.0, 1.0, 4.0, 2.0, 3.0],
    "b": [2.0, 2.0, 2.0, 2.0, 2.0],
    "t": [0.5, 0.5, 0.5, 0.5, None],  # None: failed
}
RETRIED_B = {1, 3}


def attempt(name: str, number: int, status: ModuleStatus, seconds: float) -> ModuleRecord:
    start = T0 + timedelta(seconds=number)
    return ModuleRecord(status=status, attempts=number, started_at=isoformat(start),
                        finished_at=isoformat(start + timedelta(seconds=seconds)), duration_s=seconds)


def execution_events(index: int, prog: Program) -> list[Event]:
    execution_id = f"{prog.name}-{index}"
    events: list[Event] = []
    final: dict[str, ModuleRecord] = {}
    for name, durations in DURATIONS.items():
        number = 1
        if name == "b" and index in RETRIED_B:
            events.append(RecordEvent(execution_id, name, attempt(name, 1, ModuleStatus.RETRYING, 0.05)))
            number = 2
        seconds = durations[index]
        status = ModuleStatus.FAILED if seconds is None else ModuleStatus.SUCCEEDED
        final[name] = attempt(name, number, status, 0.01 if seconds is None else seconds)
        events.append(RecordEvent(execution_id, name, final[name]))
    status = ExecutionStatus.FAILED if "t" in final and final["t"].status is ModuleStatus.FAILED else ExecutionStatus.SUCCEEDED
    result = ExecutionResult(execution_id=execution_id, program=prog.name, strategy="levels", status=status,
                             outputs={}, modules=final, submitted_at=isoformat(T0 + timedelta(minutes=index)))
    return [*events, FinishedEvent(result)]


def record_history(history: HistoryStore, prog: Program) -> None:
    plan = prog.plan()
    for index in range(5):
        info = ExecutionInfo(f"{prog.name}-{index}", prog.name, plan.fingerprint, "levels",
                             submitted_at=isoformat(T0 + timedelta(minutes=index)), plan=plan)
        history.apply(execution_events(index, prog), lambda _id, info=info: info)


@pytest.fixture
def history(tmp_path) -> HistoryStore:
    store = HistoryStore(f"sqlite:///{tmp_path / 'history.db'}")
    record_history(store, DIAMOND)
    return store


def test_percentiles_interpolate_between_closest_ranks() -> None:
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile(values, 50) == 3.0
    assert percentile(values, 95) == pytest.approx(4.8, abs=1e-12)
    assert percentile(values, 99) == pytest.approx(4.96, abs=1e-12)
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 5.0
    assert percentile([7.0], 95) == 7.0


def test_module_statistics_are_exact(history: HistoryStore) -> None:
    report = optimize(history, "diamond")
    a, b, s, t = (report.modules[name] for name in "abst")
    assert report.executions == 5
    assert (a.runs, a.attempts, a.p50_s) == (5, 5, 3.0)
    assert a.p95_s == pytest.approx(4.8, abs=1e-12) and a.p99_s == pytest.approx(4.96, abs=1e-12)
    assert s.p50_s == pytest.approx(0.3) and s.p95_s == pytest.approx(0.48)
    # b: retried in 2 of 5 runs (retry durations are not the module's duration)
    assert (b.runs, b.attempts, b.p50_s, b.retry_rate, b.failure_rate) == (5, 7, 2.0, 0.4, 0.0)
    # t: failed in 1 of 5 runs; durations from its 4 successes
    assert (t.runs, t.failure_rate, t.p50_s) == (5, 0.2, 0.5)


def test_critical_path_and_bottlenecks_by_observed_duration(history: HistoryStore) -> None:
    report = optimize(history, "diamond")
    # weights are p50s: s 0.3, a 3.0, b 2.0, t 0.5 -> s, a, t = 3.8 s
    assert report.critical_path == ["s", "a", "t"]
    assert report.critical_path_s == pytest.approx(3.8)
    # a instant -> s, b, t = 2.8 (saves 1.0); t instant saves 0.5; s instant saves 0.3
    ranking = [(item.module, round(item.saving_s, 9)) for item in report.bottlenecks]
    assert ranking == [("a", 1.0), ("t", 0.5), ("s", 0.3)]


def test_recommendations(history: HistoryStore) -> None:
    report = optimize(history, "diamond")
    # timeout = max(p99 x 1.5, p99 + 1 s), rounded up to 0.1 s
    assert report.modules["a"].recommended_timeout_s == 7.5  # 4.96 x 1.5 = 7.44
    assert report.modules["s"].recommended_timeout_s == 1.5  # 0.496 + 1
    assert learned_timeout(10.0) == 15.0
    # b needed 2 attempts with max_attempts 2: one spare
    assert report.modules["b"].recommended_retry == {"max_attempts": 3}
    assert report.modules["a"].recommended_retry is None
    # one module per level on the long path: level barriers cost nothing
    assert report.strategy.recommended == "levels"
    assert report.strategy.levels_estimate_s == pytest.approx(3.8)


def test_dag_is_advised_when_level_barriers_cost_time() -> None:
    # x1 (1.0) -> x2 (0.1) and y1 (0.1) -> y2 (1.0): levels take 2.0 s, the critical path 1.1 s
    prog = program("crossed", {
        "x1": {"uses": NOOP}, "y1": {"uses": NOOP},
        "x2": {"uses": NOOP, "depends_on": ["x1"]}, "y2": {"uses": NOOP, "depends_on": ["y1"]},
    })
    plan = prog.plan()
    from dspex_celery.history.models import AttemptRow

    seconds = {"x1": 1.0, "x2": 0.1, "y1": 0.1, "y2": 1.0}
    rows = [AttemptRow(execution_id="e", module=name, attempt=1, status="succeeded", duration_s=value, reused=False)
            for name, value in seconds.items()]
    report = analyze(plan, rows, 1)
    assert report.strategy.recommended == "dag"
    assert (report.strategy.levels_estimate_s, report.strategy.critical_path_s) == pytest.approx((2.0, 1.1))


def test_profile_is_used_for_that_program_version_only(history: HistoryStore, tmp_path) -> None:
    optimize(history, "diamond")
    settings = Settings(history_url=history.url)
    plan = apply_profile(settings, DIAMOND, DIAMOND.plan())
    # priorities: longest remaining path by observed seconds (s: 3.8, a: 3.5, b: 2.5, t: 0.5)
    assert {name: module.priority for name, module in plan.modules.items()} == pytest.approx(
        {"s": 3.8, "a": 3.5, "b": 2.5, "t": 0.5})
    assert plan.critical_path == ["s", "a", "t"]
    # By default a profile changes priorities only: no timeout nobody set
    assert {name: module.timeout_s for name, module in plan.modules.items()} == {"s": None, "a": None, "b": None,
                                                                                 "t": 9.0}
    # Opted in, learned timeouts fill in where the program sets none; t keeps its own 9 s
    learned = apply_profile(settings, DIAMOND, DIAMOND.plan(), learned_timeouts=True)
    assert learned.modules["a"].timeout_s == 7.5 and learned.modules["t"].timeout_s == 9.0
    assert learned.modules["t"].timeout_source is None
    # A changed program (new fingerprint) does not reuse the stale profile
    changed = program("diamond", {**DIAMOND.to_dict()["modules"], "u": {"uses": NOOP, "depends_on": ["t"]}})
    fresh = apply_profile(settings, changed, changed.plan(), learned_timeouts=True)
    assert fresh.fingerprint != plan.fingerprint
    assert fresh.modules["a"].timeout_s is None and fresh.modules["s"].priority == 4.0  # module counts
    # And history turned off means no profile
    off = apply_profile(Settings(history_url="off"), DIAMOND, DIAMOND.plan(), learned_timeouts=True)
    assert off.modules["a"].timeout_s is None


def test_learned_timeouts_are_opted_in_and_the_plan_says_where_they_came_from(history: HistoryStore) -> None:
    optimize(history, "diamond")
    settings = Settings(history_url=history.url)
    opted_in = Settings(history_url=history.url, learned_timeouts=True)
    keyed = program("diamond", DIAMOND.to_dict()["modules"], timeouts="learned")
    refused = program("diamond", DIAMOND.to_dict()["modules"], timeouts="program")

    def timeout_of(prog: Program, chosen: Settings, requested: bool | None = None) -> float | None:
        return apply_profile(chosen, prog, prog.plan(), learned_timeouts=requested).modules["a"].timeout_s

    # The program's timeouts: key is how to run it, not what it computes: same fingerprint, same profile
    assert keyed.plan().fingerprint == refused.plan().fingerprint == DIAMOND.plan().fingerprint
    # Off unless asked; the run's choice, then the program's key, then the setting decide
    assert timeout_of(DIAMOND, settings) is None
    assert timeout_of(DIAMOND, settings, True) == timeout_of(keyed, settings) == timeout_of(DIAMOND, opted_in) == 7.5
    assert timeout_of(keyed, settings, False) is None and timeout_of(refused, opted_in) is None
    assert timeout_of(refused, settings, True) == 7.5
    # The plan records how each was learned and how to turn it off (for the worker's ModuleTimeout)
    sources = {
        name: apply_profile(chosen, prog, prog.plan(), learned_timeouts=requested).modules["a"].timeout_source
        for name, prog, chosen, requested in [("run", DIAMOND, settings, True), ("program", keyed, settings, None),
                                              ("settings", DIAMOND, opted_in, None)]
    }
    basis = "p99 4.96 s of 5 runs × 1.5, from optimize"
    assert sources == {
        "run": f"{basis}; set timeout_s in the program or run without --learned-timeouts",
        "program": f"{basis}; set timeout_s in the program or drop its 'timeouts: learned'",
        "settings": f"{basis}; set timeout_s in the program or turn off learned_timeouts (DSPEX_LEARNED_TIMEOUTS)",
    }
    # s: p99 0.496 s, the 1 s floor gives its headroom; the source survives the plan's JSON
    plan = apply_profile(settings, DIAMOND, DIAMOND.plan(), learned_timeouts=True)
    again = Plan.from_json(plan.to_json()).modules["s"]
    assert again.timeout_source == plan.modules["s"].timeout_source
    assert again.overran() == ("module 's' ran longer than its learned timeout_s 1.5 s (p99 0.496 s of 5 runs + 1 s, "
                               "from optimize; set timeout_s in the program or run without --learned-timeouts)")


def test_a_bad_timeouts_key_is_one_program_error() -> None:
    from dspex_celery.errors import ProgramError

    with pytest.raises(ProgramError, match="timeouts: Input should be 'learned' or 'program'"):
        program("diamond", DIAMOND.to_dict()["modules"], timeouts="sometimes").plan()


def test_optimize_without_saving_keeps_the_stored_profile(history: HistoryStore) -> None:
    saved = optimize(history, "diamond")
    fingerprint = DIAMOND.plan().fingerprint
    stored = history.profile(fingerprint)
    assert saved.saved and stored == saved.profile
    # Two more runs where a takes 10 s: what would be saved changes, the stored profile does not
    for index in (5, 6):
        info = ExecutionInfo(f"diamond-{index}", "diamond", fingerprint, "levels",
                             submitted_at=isoformat(T0 + timedelta(minutes=index)), plan=DIAMOND.plan())
        events: list[Event] = [RecordEvent(info.execution_id, "a", attempt("a", 1, ModuleStatus.SUCCEEDED, 10.0))]
        result = ExecutionResult(execution_id=info.execution_id, program="diamond", strategy="levels",
                                 status=ExecutionStatus.SUCCEEDED, outputs={}, modules={},
                                 submitted_at=info.submitted_at)
        history.apply([*events, FinishedEvent(result)], lambda _id, info=info: info)
    dry = optimize(history, "diamond", save=False)
    assert not dry.saved and dry.executions == 7
    assert dry.profile["timeouts"]["a"] > stored["timeouts"]["a"]
    assert history.profile(fingerprint) == stored


def test_optimize_without_history_is_a_clear_error(history: HistoryStore) -> None:
    from dspex_celery.errors import UsageError

    with pytest.raises(UsageError, match="no executions of program 'nothing' in the history"):
        optimize(history, "nothing")


def test_progress_eta_durations_come_from_history(history: HistoryStore) -> None:
    from dspex_celery.cli.progress import expected_durations
    from dspex_celery.bootstrap import create_runtime

    runtime = create_runtime(Settings(namespace="eta-test", history_url=history.url))
    # Before any profile is saved: p50s of the recent runs
    assert expected_durations(runtime, DIAMOND.plan()) == pytest.approx({"s": 0.3, "a": 3.0, "b": 2.0, "t": 0.5})
    # A program history has never seen: no durations, so no ETA
    other = program("other", {"x": {"uses": NOOP}})
    assert expected_durations(runtime, other.plan()) is None


# --- against real workers -------------------------------------------------------------------------

NAP = "tests.modules.history_mods:nap"


@pytest.mark.integration
def test_learned_timeouts_fail_a_slow_run_only_when_opted_in(make_cluster, redis_url: str, tmp_path) -> None:
    import json

    from dspex_celery import create_runtime, submit_program
    from tests.conftest import HistoryCluster

    cluster = make_cluster()
    cluster.start_worker("default", concurrency=2)  # prefork: Celery's soft time limit stops the call
    hc = HistoryCluster(cluster, f"sqlite:///{tmp_path / 'history.db'}", redis_url)
    hc.start_listener()
    # backup: false: with learned timeouts on, a learned backup would add a second failing attempt per run
    modules = {"nap": {"uses": NAP, "inputs": {"seconds": "$inputs.seconds"}, "retry": {"max_attempts": 1},
                       "backup": False}}
    prog = program("napper", modules, inputs=["seconds"])
    fingerprint = prog.plan().fingerprint

    def run(chosen: Program, seconds: float, app=hc.runtime.app):  # noqa: ANN001, ANN202
        """The execution's result as history recorded it."""
        return hc.recorded(submit_program(chosen, {"seconds": seconds}, app=app).execution_id, 60)

    try:
        # Given three 0.15 s runs and a saved profile
        for _ in range(3):
            assert run(prog, 0.15).succeeded
        optimized = hc.cli("optimize", "napper", "--json")
        assert optimized.returncode == 0, optimized.stderr
        learned = json.loads(optimized.stdout)["modules"]["nap"]["recommended_timeout_s"]
        assert learned < 1.5
        stored = hc.history.profile(fingerprint)
        # When a run takes 10x as long, by default it succeeds: the profile changed priorities only
        slow = run(prog, 1.5)
        assert slow.succeeded, slow.modules["nap"].error
        assert cluster.runtime.store.plan(slow.execution_id).modules["nap"].timeout_s is None
        # Opted in with `run --learned-timeouts`, the learned timeout fails it, and the error says so
        path = tmp_path / "napper.json"
        path.write_text(json.dumps({"name": "napper", "inputs": ["seconds"], "modules": modules}))
        ran = hc.cli("run", str(path), "-i", "seconds=1.5", "--learned-timeouts", "--json")
        assert ran.returncode == 1, ran.stderr
        p99 = f"{stored['timeout_basis']['nap']['p99_s']:.3g}"  # about 0.15
        assert (f"ModuleTimeout: module 'nap' ran longer than its learned timeout_s {learned:g} s (p99 {p99} s of "
                "3 runs + 1 s, from optimize; set timeout_s in the program or run without --learned-timeouts)"
                ) in ran.stdout + ran.stderr, ran.stdout + ran.stderr
        # Opted in with the program's `timeouts: learned` (same fingerprint, same profile) or the setting
        keyed = run(program("napper", modules, inputs=["seconds"], timeouts="learned"), 1.5)
        assert keyed.modules["nap"].error.endswith("drop its 'timeouts: learned')")
        opted = create_runtime(hc.runtime.settings.model_copy(update={"learned_timeouts": True}))
        by_setting = run(prog, 1.5, app=opted.app)
        assert by_setting.modules["nap"].error.endswith("turn off learned_timeouts (DSPEX_LEARNED_TIMEOUTS))")
        # `optimize --dry-run` shows the profile the slower history gives, and leaves the stored one as it was
        wait_for(lambda: len(hc.history.finished_executions(fingerprint)) == 7, 30, hc.logs)
        dry = hc.cli("optimize", "napper", "--dry-run", "--json")
        assert dry.returncode == 0, dry.stderr
        report = json.loads(dry.stdout)
        assert not report["saved"] and report["executions"] == 7
        assert report["profile"]["timeouts"]["nap"] > learned
        assert hc.history.profile(fingerprint) == stored
        by_file = hc.cli("optimize", str(path), "--dry-run", "--json")  # the program file names it too
        assert by_file.returncode == 0, by_file.stderr
        assert json.loads(by_file.stdout)["executions"] == 7
        shown = hc.cli("optimize", "napper", "--dry-run")
        assert "dry run, profile not saved (the stored one is unchanged)" in shown.stdout, shown.stderr
        assert hc.history.profile(fingerprint) == stored
        # A batch run takes the same switch: its slow line fails on the learned timeout only when opted in
        lines, output = tmp_path / "lines.jsonl", tmp_path / "out.jsonl"
        lines.write_text('{"seconds": 1.5}\n')
        batch = hc.cli("run", str(path), "--inputs-file", str(lines), "--output", str(output), "--learned-timeouts")
        assert batch.returncode == 1, batch.stderr
        assert "learned timeout_s" in output.read_text()
        batch = hc.cli("run", str(path), "--inputs-file", str(lines), "--output", str(output), "--fresh")
        assert batch.returncode == 0, batch.stderr + output.read_text()
    finally:
        hc.stop()
