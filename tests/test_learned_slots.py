"""Slot counts per resource class, learned from history by ``optimize`` into the profile."""

from __future__ import annotations

from datetime import datetime, timedelta

from dspex_celery import ExecutionResult, ExecutionStatus, ModuleRecord, ModuleStatus
from dspex_celery.cli.history import print_report
from dspex_celery.history.events import ExecutionInfo, FinishedEvent, RecordEvent
from dspex_celery.history.store import HistoryStore
from dspex_celery.optimizer import learned_slots, optimize
from dspex_celery.results import isoformat, utcnow
from tests.conftest import program

NOOP = "tests.modules.basic:echo"
T0 = utcnow()

#  x (2 s) -> y (5 s);  w (0.5 s);  z (0.5 s)      x and y on "llm", w and z on "io"
CROSSED = program("crossed", {
    "x": {"uses": NOOP, "resource": "llm"}, "y": {"uses": NOOP, "depends_on": ["x"], "resource": "llm"},
    "w": {"uses": NOOP, "resource": "io"}, "z": {"uses": NOOP, "resource": "io"},
})
SECONDS = {"x": 2.0, "y": 5.0, "w": 0.5, "z": 0.5}


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_slots_are_the_most_attempts_of_a_class_running_at_once_in_one_execution() -> None:
    spans = [
        ("e1", "llm", at(0), at(2)), ("e1", "llm", at(1), at(3)), ("e1", "llm", at(1.5), at(2.5)),
        ("e1", "io", at(0), at(1)), ("e1", "io", at(1), at(2)),  # one ends as the next starts: one slot
        ("e2", "llm", at(0), at(1)), ("e2", "llm", at(0), at(1)),
        ("e3", "io", at(0), at(5)), ("e4", "io", at(0), at(5)),  # two executions at once: one slot each
    ]
    assert learned_slots(spans) == {"io": 1, "llm": 3}


def record(name: str, start: float) -> ModuleRecord:
    return ModuleRecord(status=ModuleStatus.SUCCEEDED, attempts=1, started_at=isoformat(at(start)),
                        finished_at=isoformat(at(start + SECONDS[name])), duration_s=SECONDS[name],
                        resource=CROSSED.plan().modules[name].resource, worker="w1")


def test_optimize_learns_each_resource_class_slots_and_shows_them(tmp_path, capsys) -> None:
    # Given two recorded runs: llm modules one at a time, the two io modules at once
    history = HistoryStore(f"sqlite:///{tmp_path / 'history.db'}")
    plan = CROSSED.plan()
    starts = {"x": 0.0, "y": 2.0, "w": 0.0, "z": 0.0}
    for index in range(2):
        execution_id = f"crossed-{index}"
        info = ExecutionInfo(execution_id, "crossed", plan.fingerprint, "dag", submitted_at=isoformat(T0), plan=plan)
        records = {name: record(name, start) for name, start in starts.items()}
        result = ExecutionResult(execution_id=execution_id, program="crossed", strategy="dag",
                                 status=ExecutionStatus.SUCCEEDED, outputs={}, modules=records,
                                 submitted_at=isoformat(T0))
        events = [*(RecordEvent(execution_id, name, item) for name, item in records.items()), FinishedEvent(result)]
        history.apply(events, lambda _id, info=info: info)
    # When it is optimized
    report = optimize(history, "crossed")
    # Then the profile has each class's slots, and optimize's output shows them
    assert report.profile["slots"] == {"io": 2, "llm": 1}
    print_report(report)
    assert "slots per resource class (most modules running at once): io 2, llm 1" in capsys.readouterr().out
