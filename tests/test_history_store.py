"""The history store on SQLite and on PostgreSQL: idempotent, order-independent writes, schema check."""

from __future__ import annotations

import random
import subprocess
from datetime import timedelta

import pytest
import sqlalchemy as sa

from dspex_celery import ExecutionResult, ExecutionStatus, ModuleRecord, ModuleStatus
from dspex_celery.errors import ConfigError, UnknownExecution
from dspex_celery.history.events import Event, ExecutionInfo, FinishedEvent, RecordEvent
from dspex_celery.history.store import HistoryStore
from dspex_celery.results import isoformat, utcnow
from tests.conftest import CLI, ROOT, program

T0 = utcnow()


@pytest.fixture(params=["sqlite", "postgresql"])
def history_url(request: pytest.FixtureRequest, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'history.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def history(history_url: str) -> HistoryStore:
    return HistoryStore(history_url)


PLAN = program(
    "story",
    {
        "fetch": {"uses": "tests.modules.basic:echo"},
        "flaky": {"uses": "tests.modules.basic:echo", "depends_on": ["fetch"]},
        "after": {"uses": "tests.modules.basic:echo", "depends_on": ["flaky"]},
        "never": {"uses": "tests.modules.basic:echo", "depends_on": ["fetch"]},
    },
).plan()


def at(seconds: float) -> str:
    return isoformat(T0 + timedelta(seconds=seconds))


def rec(status: ModuleStatus, attempt: int, start: float | None = None, end: float | None = None, **extra) -> ModuleRecord:
    return ModuleRecord(
        status=status, attempts=attempt, resource="default", worker="w1@host",
        started_at=at(start) if start is not None else None, finished_at=at(end) if end is not None else None,
        duration_s=(end - start) if start is not None and end is not None else None, **extra,
    )


def story(execution_id: str) -> tuple[list[Event], ExecutionResult]:
    """An execution: ``flaky`` fails once (retried), ``never`` is skipped; the events and the result."""
    final = {
        "fetch": rec(ModuleStatus.SUCCEEDED, 1, 0.0, 0.5),
        "flaky": rec(ModuleStatus.SUCCEEDED, 2, 1.0, 1.25),
        "after": rec(ModuleStatus.SUCCEEDED, 1, 2.0, 2.5),
        "never": ModuleRecord(status=ModuleStatus.SKIPPED, error="skipped: upstream module 'x' failed", resource="default"),
    }
    steps = [
        ("fetch", rec(ModuleStatus.RUNNING, 1, 0.0)),
        ("fetch", final["fetch"]),
        ("flaky", rec(ModuleStatus.RUNNING, 1, 0.5)),
        ("flaky", rec(ModuleStatus.RETRYING, 1, 0.5, 0.75, error="TransientError: rate limited")),
        ("flaky", rec(ModuleStatus.RUNNING, 2, 1.0)),
        ("flaky", final["flaky"]),
        ("never", final["never"]),
        ("after", rec(ModuleStatus.RUNNING, 1, 2.0)),
        ("after", final["after"]),
    ]
    result = ExecutionResult(
        execution_id=execution_id, program="story", strategy="levels", status=ExecutionStatus.SUCCEEDED,
        outputs={"after": {"ok": True}}, modules=final, submitted_at=at(-0.25), finished_at=at(3.0),
    )
    events: list[Event] = [RecordEvent(execution_id, name, record, "dspex.default") for name, record in steps]
    return [*events, FinishedEvent(result)], result


def describe(execution_id: str) -> ExecutionInfo:
    return ExecutionInfo(execution_id, "story", PLAN.fingerprint, "levels", submitted_at=at(-0.25), plan=PLAN)


def attempt_rows(history: HistoryStore, execution_id: str) -> list[tuple[str, int, str]]:
    return [(row.module, row.attempt, row.status) for row in history.attempts([execution_id])]


EXPECTED_ROWS = [
    ("after", 1, "succeeded"),
    ("fetch", 1, "succeeded"),
    ("flaky", 1, "retrying"),
    ("flaky", 2, "succeeded"),
    ("never", 0, "skipped"),
]


def test_events_in_order_give_one_row_per_attempt_and_the_run_result(history: HistoryStore) -> None:
    events, result = story("e-inorder")
    history.apply(events, describe)
    assert attempt_rows(history, "e-inorder") == EXPECTED_ROWS
    # `show` gives back exactly what `run --json` printed
    assert history.result("e-inorder").to_json_dict() == result.to_json_dict()
    retried = next(row for row in history.attempts(["e-inorder"]) if row.module == "flaky")
    assert (retried.error_type, retried.error_message, retried.queue) == ("TransientError", "rate limited", "dspex.default")
    assert retried.duration_s == pytest.approx(0.25)
    row = history.executions()[0]
    assert row.started_at == T0 and row.fingerprint == PLAN.fingerprint and row.status == "succeeded"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_repeated_and_shuffled_events_give_the_same_history(history: HistoryStore, seed: int) -> None:
    execution_id = f"e-shuffled-{seed}"
    events, result = story(execution_id)
    rng = random.Random(seed)
    noisy = events + rng.sample(events, k=len(events))  # every event twice, in a random order
    rng.shuffle(noisy)
    for start in range(0, len(noisy), 4):  # several batches, as the listener writes them
        history.apply(noisy[start : start + 4], describe)
    assert attempt_rows(history, execution_id) == EXPECTED_ROWS
    assert history.result(execution_id).to_json_dict() == result.to_json_dict()


def test_an_attempt_whose_worker_died_is_marked_lost_until_it_reports(history: HistoryStore) -> None:
    first = RecordEvent("e-lost", "fetch", rec(ModuleStatus.RUNNING, 1, 0.0))
    second = RecordEvent("e-lost", "fetch", rec(ModuleStatus.RUNNING, 2, 1.0))
    history.apply([first, second], describe)
    assert attempt_rows(history, "e-lost") == [("fetch", 1, "lost"), ("fetch", 2, "running")]
    # a "running" repeat does not resurrect it, a real outcome (a late report) wins
    history.apply([first], describe)
    assert attempt_rows(history, "e-lost")[0] == ("fetch", 1, "lost")
    history.apply([RecordEvent("e-lost", "fetch", rec(ModuleStatus.SUCCEEDED, 1, 0.0, 0.5))], describe)
    assert attempt_rows(history, "e-lost")[0] == ("fetch", 1, "succeeded")


def test_running_execution_is_listed_and_shown(history: HistoryStore) -> None:
    history.apply([RecordEvent("e-open", "fetch", rec(ModuleStatus.RUNNING, 1, 0.0))], describe)
    shown = history.result("e-open")
    assert shown.status is ExecutionStatus.RUNNING
    assert shown.modules["fetch"].status is ModuleStatus.RUNNING
    assert shown.modules["after"].status is ModuleStatus.PENDING  # known from the plan
    assert [row.id for row in history.executions(program="story")] == ["e-open"]
    assert history.executions(program="other") == []


def test_history_lists_most_recent_first_with_a_limit(history: HistoryStore) -> None:
    for index in range(3):
        info = ExecutionInfo(f"e-{index}", "story", PLAN.fingerprint, "levels", submitted_at=at(index), plan=PLAN)
        history.apply([RecordEvent(info.execution_id, "fetch", rec(ModuleStatus.RUNNING, 1, index))], lambda _id, i=info: i)
    assert [row.id for row in history.executions(limit=2)] == ["e-2", "e-1"]


def test_unknown_execution_is_a_clear_error(history: HistoryStore) -> None:
    with pytest.raises(UnknownExecution, match="no execution 'nope' in the history"):
        history.result("nope")


def test_database_of_another_schema_version_is_refused(history_url: str, history: HistoryStore) -> None:
    with history.engine.begin() as connection:
        connection.execute(sa.text("UPDATE dspex_schema SET version = 99"))
    with pytest.raises(ConfigError, match="has schema version 99, this dspex-celery uses 1"):
        HistoryStore(history_url)


def test_cli_errors_are_one_line(tmp_path) -> None:
    # Given a history database URL where there is no database yet
    env = {"DSPEX_HISTORY_URL": f"sqlite:///{tmp_path / 'none.db'}", "PATH": "/usr/bin:/bin"}
    missing = subprocess.run([CLI, "history"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [f"error: no history database at {tmp_path / 'none.db'}: run a program or start the listener first"]
    # And an unknown execution in an existing one
    HistoryStore(env["DSPEX_HISTORY_URL"])
    unknown = subprocess.run([CLI, "show", "abc"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert unknown.returncode == 2 and len(unknown.stderr.strip().splitlines()) == 1
    assert "no execution 'abc' in the history" in unknown.stderr


def test_nul_characters_in_errors_and_outputs_are_stored(history: HistoryStore) -> None:
    # A module's error message and outputs may hold any character; PostgreSQL text refuses NUL
    failed = rec(ModuleStatus.FAILED, 1, 0.0, 0.5, error="ValueError: bad\x00byte")
    result = ExecutionResult(
        execution_id="e-nul", program="story", strategy="levels", status=ExecutionStatus.FAILED,
        outputs={"raw": "a\x00b"}, modules={"fetch": failed}, failed_modules=["fetch"], error="ValueError: bad\x00byte",
    )
    history.apply([RecordEvent("e-nul", "fetch", failed), FinishedEvent(result)], describe)
    row = history.attempts(["e-nul"])[0]
    assert (row.error_type, row.error_message) == ("ValueError", "bad\ufffdbyte")
    shown = history.result("e-nul")
    assert shown.outputs == {"raw": "a\x00b"} and shown.modules["fetch"].error == "ValueError: bad\x00byte"
