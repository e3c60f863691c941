"""What an execution reports: module records and the execution result (the ``--json`` shape)."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict


class ModuleStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in _FINAL_MODULE


_FINAL_MODULE = {ModuleStatus.SUCCEEDED, ModuleStatus.FAILED, ModuleStatus.SKIPPED, ModuleStatus.CANCELLED}


class ExecutionStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self not in (ExecutionStatus.PENDING, ExecutionStatus.RUNNING)


class ModuleRecord(BaseModel):
    """One module of one execution: its final (or current) state and where it ran."""

    model_config = ConfigDict(extra="allow")

    status: ModuleStatus = ModuleStatus.PENDING
    attempts: int = 0
    started_at: str | None = None
    finished_at: str | None = None
    duration_s: float | None = None
    worker: str | None = None
    error: str | None = None
    resource: str | None = None
    reused: bool = False
    waited_s: float | None = None  # waited for a resource-class slot; started_at is after the wait
    waiting_for: str | None = None  # resource class whose slot the module is waiting for now
    lost_attempts: int = 0  # attempts whose worker process died (killed, out of memory); re-run


class ExecutionResult(BaseModel):
    """The outcome of one execution, exactly what ``run --json`` prints."""

    execution_id: str
    program: str
    strategy: str
    status: ExecutionStatus
    outputs: dict[str, Any]
    modules: dict[str, ModuleRecord]
    failed_modules: list[str] = []
    error: str | None = None
    submitted_at: str | None = None
    finished_at: str | None = None
    resumed_from: str | None = None

    @property
    def succeeded(self) -> bool:
        return self.status is ExecutionStatus.SUCCEEDED

    def to_json_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def describe_failure(result: ExecutionResult) -> str:
    """One line: which execution failed (or was cancelled) and why (failed modules first)."""
    reasons = [f"module '{name}': {result.modules[name].error}" for name in result.failed_modules
               if name in result.modules]
    why = "; ".join(reasons) or result.error or "no error recorded"
    return f"program '{result.program}' {result.status.value} (execution {result.execution_id}): {why}"


def utcnow() -> datetime:
    return datetime.now(UTC)


def isoformat(moment: datetime) -> str:
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))
