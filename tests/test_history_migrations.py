"""History schema migrations (Alembic) on SQLite and PostgreSQL: new databases, databases made before
Alembic, revisions newer than the code, concurrent first opens, and the cost of opening one at head."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from dspex_celery.errors import ConfigError
from dspex_celery.history.events import ExecutionInfo, RecordEvent
from dspex_celery.history.migrations import HEAD, VERSION_TABLE, alembic_config
from dspex_celery.history.models import EXECUTIONS, SCHEMA, metadata
from dspex_celery.history.store import HistoryStore
from dspex_celery.results import ModuleRecord, ModuleStatus, utcnow
from tests.conftest import CLI, ROOT

SUBMITTED = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgresql"])
def history_url(request: pytest.FixtureRequest, tmp_path) -> str:
    """A database of its own: a new SQLite file, or a new PostgreSQL schema."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'history.db'}"
    return request.getfixturevalue("postgres_url")


def revision(url: str) -> str | None:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE}).get_current_revision()
    finally:
        engine.dispose()


def sql(url: str, statement: str) -> list[tuple]:
    engine = sa.create_engine(url)
    try:
        with engine.begin() as connection:
            result = connection.execute(sa.text(statement))
            return [tuple(row) for row in result] if result.returns_rows else []
    finally:
        engine.dispose()


def made_before_alembic(url: str) -> None:
    """A database as releases before Alembic left it: ``create_all``, the version row, one execution."""
    engine = sa.create_engine(url)
    metadata.create_all(engine)
    with engine.begin() as connection:  # columns added by later revisions (0002) did not exist then
        connection.execute(sa.text("ALTER TABLE dspex_executions DROP COLUMN compensations"))
    with engine.begin() as connection:
        connection.execute(SCHEMA.insert().values(name="history", version=1))
        connection.execute(EXECUTIONS.insert().values(id="e-old", program="story", status="succeeded", rank=3,
                                                      outputs={"answer": 42}, submitted_at=SUBMITTED))
    engine.dispose()


def test_head_is_the_newest_script() -> None:
    assert ScriptDirectory.from_config(alembic_config()).get_heads() == [HEAD]


def test_new_database_is_migrated_to_head_and_usable(history_url: str) -> None:
    history = HistoryStore(history_url)
    assert revision(history_url) == HEAD
    # the migrations build exactly the tables the models describe
    with history.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
        assert compare_metadata(context, metadata) == []
    record = ModuleRecord(status=ModuleStatus.RUNNING, attempts=1, resource="default", started_at=utcnow().isoformat())
    history.apply([RecordEvent("e-new", "fetch", record)], lambda _id: ExecutionInfo("e-new", "story", None, "levels"))
    assert [row.id for row in history.executions()] == ["e-new"]
    assert sql(history_url, "SELECT name, version FROM dspex_schema") == [("history", 1)]


def test_database_made_before_alembic_keeps_its_rows_and_reaches_head(history_url: str) -> None:
    made_before_alembic(history_url)
    history = HistoryStore(history_url)
    assert revision(history_url) == HEAD
    kept = history.result("e-old")
    assert (kept.program, kept.status.value, kept.outputs) == ("story", "succeeded", {"answer": 42})
    assert history.executions()[0].submitted_at == SUBMITTED
    # and opening it again is the one-query path
    HistoryStore(history_url)
    assert sql(history_url, f"SELECT version_num FROM {VERSION_TABLE}") == [(HEAD,)]


def test_revision_newer_than_this_code_is_refused_with_one_line(history_url: str) -> None:
    HistoryStore(history_url)
    sql(history_url, f"UPDATE {VERSION_TABLE} SET version_num = '9a7f0future'")
    shown = sa.make_url(history_url).render_as_string(hide_password=True)
    expected = (f"history database {shown} is at schema revision 9a7f0future, newer than this dspex-celery knows "
                f"(head {HEAD}): upgrade dspex-celery")
    with pytest.raises(ConfigError) as refused:
        HistoryStore(history_url)
    assert str(refused.value) == expected
    # the CLI says the same in one line, exit 2, and leaves the database as it was
    env = {**os.environ, "DSPEX_HISTORY_URL": history_url}
    cli = subprocess.run([CLI, "history"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert (cli.returncode, cli.stderr.strip().splitlines()) == (2, [f"error: {expected}"])
    assert revision(history_url) == "9a7f0future"


def test_reading_commands_never_create_tables(history_url: str) -> None:
    sql(history_url, "CREATE TABLE unrelated (id INTEGER)")  # a database, but not a history one
    with pytest.raises(ConfigError, match="no history database at .*: run a program or start the listener first"):
        HistoryStore(history_url, create=False)
    assert revision(history_url) is None


OPEN_AT_ONCE = """
import sys, time
import alembic.command  # imported before the start line: the opens race for real
from dspex_celery.history.store import HistoryStore
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
HistoryStore(sys.argv[1])
"""


def test_processes_opening_a_new_database_at_once_all_succeed(history_url: str) -> None:
    start = time.time() + 3.0
    openers = [
        subprocess.Popen([sys.executable, "-c", OPEN_AT_ONCE, history_url, str(start)], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    outcomes = [(opener.wait(timeout=120), opener.stderr.read() if opener.stderr else "") for opener in openers]
    assert [code for code, _ in outcomes] == [0, 0, 0, 0], outcomes
    assert revision(history_url) == HEAD
    assert sql(history_url, "SELECT name, version FROM dspex_schema") == [("history", 1)]


COUNT_OPEN = """
import sys
import sqlalchemy as sa
from dspex_celery.history.store import HistoryStore
statements = []
sa.event.listen(sa.Engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
HistoryStore(sys.argv[1])
print(len(statements), "alembic" in sys.modules)
"""


def test_opening_a_database_at_head_is_one_query_without_alembic(tmp_path) -> None:
    # embedded runs open the history in every process: at head it costs one query and no Alembic import
    url = f"sqlite:///{tmp_path / 'history.db'}"
    HistoryStore(url)
    counted = subprocess.run([sys.executable, "-c", COUNT_OPEN, url], cwd=ROOT, capture_output=True, text=True,
                             timeout=60, check=True)
    assert counted.stdout.split() == ["1", "False"]
