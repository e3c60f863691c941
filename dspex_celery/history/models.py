"""The history schema: SQLAlchemy 2 typed ORM models (SQLite and PostgreSQL).

The tables are made and changed by the Alembic scripts in ``history/migrations/versions`` (applied
when ``HistoryStore`` opens a database): a change here needs a new script that makes it (a test
compares the migrated database with these models).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
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


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON, list[str]: JSON}


class SchemaVersion(Base):
    __tablename__ = "dspex_schema"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)


class ExecutionRow(Base):
    """One execution: what ran, how it ended, its outputs."""

    __tablename__ = "dspex_executions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    program: Mapped[str | None] = mapped_column(Text, index=True)
    fingerprint: Mapped[str | None] = mapped_column(String(64), index=True)
    strategy: Mapped[str | None] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default="running")
    rank: Mapped[int] = mapped_column(Integer, default=0)
    inputs_digest: Mapped[str | None] = mapped_column(String(64))
    outputs: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    failed_modules: Mapped[list[str] | None] = mapped_column(JSON)
    #: Module -> its compensation record (``ExecutionResult.compensations``); migration 0002.
    compensations: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    submitted_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    resumed_from: Mapped[str | None] = mapped_column(String(64))

    __table_args__ = (Index("ix_dspex_executions_program_submitted", "program", "submitted_at"),)


class AttemptRow(Base):
    """One attempt of one module (attempt 0: a module that never started, e.g. skipped)."""

    __tablename__ = "dspex_module_attempts"

    execution_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("dspex_executions.id", ondelete="CASCADE"), primary_key=True
    )
    module: Mapped[str] = mapped_column(Text, primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)
    status: Mapped[str] = mapped_column(String(16))
    rank: Mapped[int] = mapped_column(Integer)
    resource: Mapped[str | None] = mapped_column(Text)
    queue: Mapped[str | None] = mapped_column(Text)
    worker: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    duration_s: Mapped[float | None] = mapped_column(Float)
    error_type: Mapped[str | None] = mapped_column(Text)
    error_message: Mapped[str | None] = mapped_column(Text)
    reused: Mapped[bool] = mapped_column(default=False)
    record: Mapped[dict[str, Any]] = mapped_column(JSON)


class ProgramPlanRow(Base):
    """The plan (graph) of a program fingerprint, for ``show`` and the optimizer."""

    __tablename__ = "dspex_program_plans"

    fingerprint: Mapped[str] = mapped_column(String(64), primary_key=True)
    program: Mapped[str] = mapped_column(Text)
    plan: Mapped[str] = mapped_column(Text)
    first_seen: Mapped[datetime]


class ProfileRow(Base):
    """The optimizer's learned profile of one program fingerprint."""

    __tablename__ = "dspex_profiles"

    fingerprint: Mapped[str] = mapped_column(String(64), primary_key=True)
    program: Mapped[str] = mapped_column(Text, index=True)
    created_at: Mapped[datetime]
    executions: Mapped[int] = mapped_column(Integer)
    profile: Mapped[dict[str, Any]] = mapped_column(JSON)
