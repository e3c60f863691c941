"""The history schema: SQLAlchemy Core tables (SQLite and PostgreSQL), and the rows read from them.

Core, not the ORM: a CLI command that opens history (an embedded ``run`` does) would import
``sqlalchemy.orm`` and configure its mappers for nothing but these five tables.

The tables are made and changed by the Alembic scripts in ``history/migrations/versions`` (applied
when ``HistoryStore`` opens a database): a change here needs a new script that makes it (a test
compares the migrated database with :data:`metadata`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Self

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    RowMapping,
    String,
    Table,
    Text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

#: The ``dspex_schema`` row's version, which releases before Alembic check (they refuse any other).
#: Bump it, in the migration that rewrites the row, only for a change those releases cannot use.
SCHEMA_VERSION = 1


class UTCDateTime(TypeDecorator[datetime]):
    """Stored as naive UTC (SQLite keeps no zone), read back as aware UTC."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


metadata = MetaData()

SCHEMA = Table(
    "dspex_schema", metadata,
    Column("name", String(32), primary_key=True),
    Column("version", Integer, nullable=False),
)

#: One execution: what ran, how it ended, its outputs.
EXECUTIONS = Table(
    "dspex_executions", metadata,
    Column("id", String(64), primary_key=True),
    Column("program", Text, index=True),
    Column("fingerprint", String(64), index=True),
    Column("strategy", String(32)),
    Column("status", String(16), nullable=False, default="running"),
    Column("rank", Integer, nullable=False, default=0),
    Column("inputs_digest", String(64)),
    Column("outputs", JSON),
    Column("failed_modules", JSON),
    Column("compensations", JSON),  # module -> its compensation record (ExecutionResult.compensations); 0002
    Column("error", Text),
    Column("submitted_at", UTCDateTime()),
    Column("started_at", UTCDateTime()),
    Column("finished_at", UTCDateTime()),
    Column("resumed_from", String(64)),
    Index("ix_dspex_executions_program_submitted", "program", "submitted_at"),
)

#: One attempt of one module (attempt 0: a module that never started, e.g. skipped).
ATTEMPTS = Table(
    "dspex_module_attempts", metadata,
    Column("execution_id", String(64), ForeignKey("dspex_executions.id", ondelete="CASCADE"), primary_key=True),
    Column("module", Text, primary_key=True),
    Column("attempt", Integer, primary_key=True),
    Column("status", String(16), nullable=False),
    Column("rank", Integer, nullable=False),
    Column("resource", Text),
    Column("queue", Text),
    Column("worker", Text),
    Column("started_at", UTCDateTime()),
    Column("finished_at", UTCDateTime()),
    Column("duration_s", Float),
    Column("error_type", Text),
    Column("error_message", Text),
    Column("reused", Boolean, nullable=False, default=False),
    Column("record", JSON, nullable=False),
)

#: The plan (graph) of a program fingerprint, for ``show`` and the optimizer.
PLANS = Table(
    "dspex_program_plans", metadata,
    Column("fingerprint", String(64), primary_key=True),
    Column("program", Text, nullable=False),
    Column("plan", Text, nullable=False),
    Column("first_seen", UTCDateTime(), nullable=False),
)

#: The optimizer's learned profile of one program fingerprint.
PROFILES = Table(
    "dspex_profiles", metadata,
    Column("fingerprint", String(64), primary_key=True),
    Column("program", Text, nullable=False, index=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("executions", Integer, nullable=False),
    Column("profile", JSON, nullable=False),
)


class _Row:
    """A row read from one of the tables, as a plain object (its columns are its fields)."""

    __slots__ = ()

    @classmethod
    def of(cls, row: RowMapping) -> Self:
        """The row of a ``select`` of the whole table."""
        return cls(**row)


@dataclass(frozen=True, slots=True)
class ExecutionRow(_Row):
    """A row of :data:`EXECUTIONS`."""

    id: str
    status: str = "running"
    rank: int = 0
    program: str | None = None
    fingerprint: str | None = None
    strategy: str | None = None
    inputs_digest: str | None = None
    outputs: dict[str, Any] | None = None
    failed_modules: list[str] | None = None
    compensations: dict[str, Any] | None = None
    error: str | None = None
    submitted_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    resumed_from: str | None = None


@dataclass(frozen=True, slots=True)
class AttemptRow(_Row):
    """A row of :data:`ATTEMPTS`."""

    execution_id: str
    module: str
    attempt: int
    status: str
    rank: int = 0
    resource: str | None = None
    queue: str | None = None
    worker: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration_s: float | None = None
    error_type: str | None = None
    error_message: str | None = None
    reused: bool = False
    record: dict[str, Any] | None = None
