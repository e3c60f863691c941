"""The history database: open it (migrated to this release's schema), write events, query it."""

from __future__ import annotations

import importlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    Select,
    Table,
    create_engine,
    event,
    func,
    select,
    update,
)
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from dspex_celery.errors import ConfigError, UnknownExecution, reason_of
from dspex_celery.history.events import (
    ATTEMPT_RANK,
    FINAL_RANK,
    LOST,
    RUNNING_RANK,
    Event,
    ExecutionInfo,
    FinishedEvent,
    RecordEvent,
)
from dspex_celery.history.location import DISABLED, data_dir, history_url, sqlite_path  # noqa: F401 (importers)
from dspex_celery.history.migrations import at_head, migrate
from dspex_celery.history.models import ATTEMPTS, EXECUTIONS, PLANS, PROFILES, AttemptRow, ExecutionRow
from dspex_celery.plan import Plan
from dspex_celery.results import (
    ExecutionResult,
    ExecutionStatus,
    ModuleRecord,
    isoformat,
    parse_time,
    utcnow,
)
from dspex_celery.settings import Settings, redact

log = logging.getLogger(__name__)

#: Tries to migrate the schema (a process waiting on another's migration lock may time out).
SCHEMA_TRIES = 5

Describe = Callable[[str], ExecutionInfo]


class HistoryStore:
    """One history database (SQLite or PostgreSQL) and the operations on it."""

    def __init__(self, url: str, *, create: bool = True) -> None:
        self.url = url
        self.engine = _engine(url, create)
        self.check_schema(create)
        self.created = create

    @property
    def display_url(self) -> str:
        """The URL without its password."""
        return self.engine.url.render_as_string(hide_password=True)

    # --- schema -----------------------------------------------------------------------------

    def check_schema(self, create: bool) -> None:
        """Bring the schema to this release's revision (see :mod:`~dspex_celery.history.migrations`);
        one query when it is there already. ``create=False`` refuses a database without tables."""
        if at_head(self.engine):
            return
        for attempt in range(SCHEMA_TRIES):
            try:
                migrate(self.engine, self.display_url, create=create)
                return
            except SQLAlchemyError as exc:  # e.g. the lock wait timed out: look again
                if attempt == SCHEMA_TRIES - 1:
                    raise ConfigError(
                        f"cannot open the history database {self.display_url} ({reason_of(exc)}): check DSPEX_HISTORY_URL"
                    ) from None
                time.sleep(0.1 * (attempt + 1))

    # --- writing events ---------------------------------------------------------------------

    def apply(self, events: Sequence[Event], describe: Describe) -> None:
        """Write events in one transaction; safe to repeat and in any order."""
        if not events:
            return
        ids = list(dict.fromkeys(event.execution_id for event in events))
        with self.engine.begin() as connection:
            self._ensure_executions(connection, ids, describe)
            for item in events:
                if isinstance(item, RecordEvent):
                    self._upsert_attempt(connection, item)
                else:
                    self._finish(connection, item)
            self._mark_lost(connection, ids)
            self._set_started(connection, ids)

    def _ensure_executions(self, connection: Connection, ids: list[str], describe: Describe) -> None:
        known = set(connection.scalars(select(EXECUTIONS.c.id).where(EXECUTIONS.c.id.in_(ids))))
        for execution_id in ids:
            if execution_id not in known:
                self._insert_execution(connection, describe(execution_id))

    def _insert_execution(self, connection: Connection, info: ExecutionInfo) -> None:
        final = ExecutionStatus(info.status).final
        values = {
            "id": info.execution_id,
            "program": info.program,
            "fingerprint": info.fingerprint,
            "strategy": info.strategy,
            "status": ExecutionStatus.RUNNING.value if final else info.status,
            "rank": RUNNING_RANK,
            "inputs_digest": info.inputs_digest,
            "submitted_at": _time(info.submitted_at),
            "resumed_from": info.resumed_from,
        }
        connection.execute(self._insert(EXECUTIONS, values).on_conflict_do_nothing(index_elements=["id"]))
        if info.plan is not None:
            self.save_plan(connection, info.plan)

    def save_plan(self, connection: Connection, plan: Plan) -> None:
        values = {"fingerprint": plan.fingerprint, "program": plan.program, "plan": plan.to_json(), "first_seen": utcnow()}
        connection.execute(self._insert(PLANS, values).on_conflict_do_nothing(index_elements=["fingerprint"]))

    def _upsert_attempt(self, connection: Connection, item: RecordEvent) -> None:
        values = attempt_values(item)
        statement = self._insert(ATTEMPTS, values)
        keys = ("execution_id", "module", "attempt")
        statement = statement.on_conflict_do_update(
            index_elements=list(keys),
            set_={name: statement.excluded[name] for name in values if name not in keys},
            where=ATTEMPTS.c.rank <= statement.excluded.rank,
        )
        connection.execute(statement)

    def _finish(self, connection: Connection, item: FinishedEvent) -> None:
        result = item.result
        connection.execute(
            update(EXECUTIONS)
            .where(EXECUTIONS.c.id == result.execution_id, EXECUTIONS.c.rank <= FINAL_RANK)
            .values(
                program=result.program,
                strategy=result.strategy,
                status=result.status.value,
                rank=FINAL_RANK,
                outputs=result.outputs,
                failed_modules=result.failed_modules,
                compensations={name: record.model_dump(mode="json") for name, record in result.compensations.items()},
                error=None if result.error is None else text_column(result.error),
                submitted_at=_time(result.submitted_at),
                finished_at=_time(result.finished_at),
                resumed_from=result.resumed_from,
            )
        )
        for module, record in result.modules.items():
            self._upsert_attempt(connection, RecordEvent(result.execution_id, module, record))

    def _mark_lost(self, connection: Connection, ids: list[str]) -> None:
        """Attempts still 'running' below a module's latest attempt: their worker died."""
        later = ATTEMPTS.alias("later")
        newest = (
            select(func.max(later.c.attempt))
            .where(later.c.execution_id == ATTEMPTS.c.execution_id, later.c.module == ATTEMPTS.c.module)
            .scalar_subquery()
        )
        connection.execute(
            update(ATTEMPTS)
            .where(ATTEMPTS.c.execution_id.in_(ids), ATTEMPTS.c.rank <= RUNNING_RANK, ATTEMPTS.c.attempt < newest)
            .values(status=LOST, rank=ATTEMPT_RANK[LOST], error_type="WorkerLost",
                    error_message="the worker running this attempt was lost")
        )

    def mark_state_lost(self, ids: Sequence[str], error: str) -> int:
        """Executions history has open whose state the store no longer has (Redis lost its data): they
        will never finish, so they end ``failed`` with ``error`` and their open attempts ``lost``;
        returns how many it ended. Finished ones are left alone."""
        if not ids:
            return 0
        with self.engine.begin() as connection:
            ended = connection.execute(
                update(EXECUTIONS)
                .where(EXECUTIONS.c.id.in_(list(ids)), EXECUTIONS.c.rank < FINAL_RANK)
                .values(status=ExecutionStatus.FAILED.value, rank=FINAL_RANK, error=text_column(error),
                        finished_at=utcnow())
            ).rowcount
            connection.execute(
                update(ATTEMPTS)
                .where(ATTEMPTS.c.execution_id.in_(list(ids)), ATTEMPTS.c.rank <= RUNNING_RANK)
                .values(status=LOST, rank=ATTEMPT_RANK[LOST], error_type="StateLost", error_message=text_column(error))
            )
        return int(ended or 0)

    def _set_started(self, connection: Connection, ids: list[str]) -> None:
        first = (
            select(func.min(ATTEMPTS.c.started_at))
            .where(ATTEMPTS.c.execution_id == EXECUTIONS.c.id)
            .scalar_subquery()
        )
        connection.execute(update(EXECUTIONS).where(EXECUTIONS.c.id.in_(ids)).values(started_at=first))

    def _insert(self, table: Table, values: dict[str, Any]) -> Any:
        name = "postgresql" if self.engine.dialect.name == "postgresql" else "sqlite"
        dialect = importlib.import_module(f"sqlalchemy.dialects.{name}")  # SQLite's history never loads PostgreSQL's
        return dialect.insert(table).values(**values)

    # --- reading ----------------------------------------------------------------------------

    def _read(self, query: Select[Any]) -> list[Any]:
        """The rows of ``query``, as mappings of column name to value."""
        with self.engine.connect() as connection:
            return list(connection.execute(query).mappings())

    def _value(self, query: Select[Any]) -> Any:
        """The first column of the first row of ``query`` (None without one)."""
        with self.engine.connect() as connection:
            return connection.execute(query).scalar()

    def executions(self, program: str | None = None, limit: int = 20) -> list[ExecutionRow]:
        """Most recent executions first."""
        query = select(EXECUTIONS)
        if program is not None:
            query = query.where(EXECUTIONS.c.program == program)
        query = query.order_by(EXECUTIONS.c.submitted_at.desc().nulls_last(), EXECUTIONS.c.id).limit(limit)
        return [ExecutionRow.of(row) for row in self._read(query)]

    def execution(self, execution_id: str) -> ExecutionRow | None:
        """The execution's row, if history has it."""
        rows = self._read(select(EXECUTIONS).where(EXECUTIONS.c.id == execution_id))
        return ExecutionRow.of(rows[0]) if rows else None

    def final_ids(self, ids: Iterable[str]) -> set[str]:
        """Those of ``ids`` whose execution is recorded as finished."""
        query = select(EXECUTIONS.c.id).where(EXECUTIONS.c.id.in_(list(ids)), EXECUTIONS.c.rank >= FINAL_RANK)
        return {row["id"] for row in self._read(query)}

    def attempts(self, execution_ids: Sequence[str]) -> list[AttemptRow]:
        """Attempt rows of these executions, by execution, module and attempt."""
        query = (
            select(ATTEMPTS)
            .where(ATTEMPTS.c.execution_id.in_(list(execution_ids)))
            .order_by(ATTEMPTS.c.execution_id, ATTEMPTS.c.module, ATTEMPTS.c.attempt)
        )
        return [AttemptRow.of(row) for row in self._read(query)]

    def plan(self, fingerprint: str) -> Plan | None:
        text = self._value(select(PLANS.c.plan).where(PLANS.c.fingerprint == fingerprint))
        return None if text is None else Plan.from_json(text)

    def result(self, execution_id: str) -> ExecutionResult:
        """The execution as history recorded it, in the ``run --json`` shape."""
        row = self.execution(execution_id)
        if row is None:
            raise UnknownExecution(
                f"no execution '{execution_id}' in the history at {self.display_url}: list them with "
                "`dspex-celery history` (a cluster's executions reach it through `dspex-celery listener`)"
            )
        plan = self.plan(row.fingerprint) if row.fingerprint else None
        modules = latest_records(self.attempts([execution_id]))
        if plan is not None:
            modules = {name: modules.get(name, ModuleRecord(resource=module.resource)) for name, module in plan.modules.items()}
        return ExecutionResult(
            execution_id=row.id,
            program=row.program or "",
            strategy=row.strategy or "",
            status=ExecutionStatus(row.status),
            outputs=row.outputs or {},
            modules=modules,
            failed_modules=row.failed_modules or [name for name, rec in modules.items() if rec.status == "failed"],
            error=row.error,
            submitted_at=optional_iso(row.submitted_at),
            finished_at=optional_iso(row.finished_at),
            resumed_from=row.resumed_from,
            compensations=row.compensations or {},
        )

    def finished_executions(self, fingerprint: str) -> list[ExecutionRow]:
        query = select(EXECUTIONS).where(EXECUTIONS.c.fingerprint == fingerprint, EXECUTIONS.c.rank >= FINAL_RANK)
        return [ExecutionRow.of(row) for row in self._read(query.order_by(EXECUTIONS.c.submitted_at))]

    def latest_fingerprint(self, program: str) -> str | None:
        """The fingerprint of the program's most recently submitted execution."""
        rows = [row for row in self.executions(program, limit=1) if row.fingerprint]
        return rows[0].fingerprint if rows else None

    # --- profiles -----------------------------------------------------------------------------

    def save_profile(self, fingerprint: str, program: str, executions: int, profile: dict[str, Any]) -> None:
        values = {"fingerprint": fingerprint, "program": program, "created_at": utcnow(),
                  "executions": executions, "profile": profile}
        with self.engine.begin() as connection:
            statement = self._insert(PROFILES, values)
            connection.execute(statement.on_conflict_do_update(
                index_elements=["fingerprint"], set_={k: statement.excluded[k] for k in values if k != "fingerprint"}
            ))

    def profile(self, fingerprint: str) -> dict[str, Any] | None:
        query = select(PROFILES.c.profile).where(PROFILES.c.fingerprint == fingerprint)
        profile: dict[str, Any] | None = self._value(query)
        return profile


def attempt_values(item: RecordEvent) -> dict[str, Any]:
    """Column values of an attempt row for a record event."""
    record = item.record
    error_type, error_message = split_error(record)
    return {
        "execution_id": item.execution_id,
        "module": item.module,
        "attempt": record.attempts,
        "status": record.status.value,
        "rank": ATTEMPT_RANK[record.status],
        "resource": record.resource,
        "queue": item.queue,
        "worker": record.worker,
        "started_at": _time(record.started_at),
        "finished_at": _time(record.finished_at),
        "duration_s": record.duration_s,
        "error_type": error_type,
        "error_message": error_message,
        "reused": record.reused,
        "record": record.model_dump(mode="json"),
    }


def split_error(record: ModuleRecord) -> tuple[str | None, str | None]:
    """``("ValueError", "boom")`` from a worker's ``"ValueError: boom"``; skips and cancels have no type."""
    if record.error is None:
        return None, None
    error = text_column(record.error)
    kind, sep, message = error.partition(": ")
    if record.status in ("failed", "retrying") and sep and kind.isidentifier():
        return kind, message
    return None, error


def text_column(text: str) -> str:
    """``text`` as every database stores it (PostgreSQL text refuses NUL characters)."""
    return text.replace("\x00", "\ufffd")


def latest_records(rows: Iterable[AttemptRow]) -> dict[str, ModuleRecord]:
    """Each module's record from its highest attempt (rows of one execution)."""
    latest: dict[str, AttemptRow] = {}
    for row in rows:
        if row.module not in latest or row.attempt > latest[row.module].attempt:
            latest[row.module] = row
    return {name: ModuleRecord.model_validate(row.record) for name, row in latest.items()}


def _time(text: str | None) -> datetime | None:
    return None if text is None else parse_time(text)


def optional_iso(moment: datetime | None) -> str | None:
    return None if moment is None else isoformat(moment)


_stores: dict[str, HistoryStore] = {}
_stores_lock = threading.Lock()


def open_history(url: str, *, create: bool = True) -> HistoryStore:
    """The process's store for ``url``; ``create=False`` never creates a database or tables."""
    with _stores_lock:
        store = _stores.get(url)
        if store is None or (create and not store.created):
            if store is not None:
                store.engine.dispose()
            store = _stores[url] = HistoryStore(url, create=create)
        return store


def _engine(url: str, create: bool) -> Engine:
    """An engine for ``url``; SQLite gets its directory, WAL and a generous busy timeout."""
    path = sqlite_path(url)
    if path is not None:
        if not create and not path.exists():
            raise ConfigError(f"no history database at {path}: run a program or start the listener first")
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        engine = create_engine(url, pool_pre_ping=True, **_engine_options(url))
    except ImportError as exc:  # the database's driver is not installed
        extra = " (pip install 'dspex-celery[postgres]')" if url.startswith("postgresql") else ""
        raise ConfigError(f"history database URL {redact(url)} needs a driver that is not installed "
                          f"({reason_of(exc)}): install it{extra}, or fix --history-url / DSPEX_HISTORY_URL") from None
    except (SQLAlchemyError, ValueError) as exc:
        raise ConfigError(f"invalid history database URL {redact(url)} ({reason_of(exc)}): "
                          "fix --history-url / DSPEX_HISTORY_URL") from None
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _engine_options(url: str) -> dict[str, Any]:
    if not url.startswith("sqlite"):
        return {}
    options: dict[str, Any] = {"connect_args": {"timeout": 30, "check_same_thread": False}}
    if sqlite_path(url) is not None:  # a file: a connection per transaction, closed at its end, so the last
        options["poolclass"] = NullPool  # one out checkpoints the WAL and removes it (no pool to clean up at exit)
    return options


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
