"""What an execution reports: module records and the execution result (the ``--json`` shape)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from dspex_celery.spec import iter_refs, parse_ref

if TYPE_CHECKING:  # plan imports this module (through the DSPy checks): no import cycle at run time
    from dspex_celery.plan import Plan


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
    # LM usage of the module's DSPy calls, all attempts so far (usage.Usage sums them): tokens DSPy
    # reported, cost when DSPy priced the calls, requests the shared LM cache answered / did not
    prompt_tokens: int = 0
    completion_tokens: int = 0
    lm_cost: float | None = None
    lm_cache_hits: int = 0
    lm_cache_misses: int = 0


class CompensationStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class CompensationRecord(BaseModel):
    """The compensation of one succeeded module of an execution that failed or was cancelled."""

    model_config = ConfigDict(extra="allow")

    status: CompensationStatus = CompensationStatus.PENDING
    attempts: int = 0
    error: str | None = None
    worker: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    duration_s: float | None = None
    lost_attempts: int = 0  # attempts whose worker process died; run again
    task_id: str | None = None  # the Celery task that holds the running claim


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
    #: Module name -> its compensation, in the order they run (only when the execution compensates).
    compensations: dict[str, CompensationRecord] = {}

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


# --- assembling an execution's result (pure: the caller reads the state store) --------------------


def build_result(
    execution_id: str,
    plan: Plan,
    meta: Mapping[str, Any],
    records: Mapping[str, ModuleRecord],
    outputs: Mapping[str, dict[str, Any]],
    status: ExecutionStatus,
    error: str | None = None,
    finished_at: str | None = None,
) -> ExecutionResult:
    """The result of an execution from its stored ``meta``, module ``records`` and ``outputs``.

    ``outputs`` maps module names to their output mappings; the error of a failed execution without
    one is its first failed module's.
    """
    modules = module_records(plan, records)
    failed = [name for name, record in modules.items() if record.status is ModuleStatus.FAILED]
    if error is None and failed and status is ExecutionStatus.FAILED:
        error = modules[failed[0]].error
    return ExecutionResult(
        execution_id=execution_id,
        program=plan.program,
        strategy=meta.get("strategy", "levels"),
        status=status,
        outputs=program_outputs(plan, {"inputs": meta.get("inputs", {}), **outputs}),
        modules=modules,
        failed_modules=failed,
        error=error,
        submitted_at=meta.get("submitted_at"),
        finished_at=finished_at,
        resumed_from=meta.get("resumed_from"),
    )


def module_records(plan: Plan, records: Mapping[str, ModuleRecord]) -> dict[str, ModuleRecord]:
    """Every module of ``plan`` with its record (a ``pending`` one where none was written)."""
    return {name: records.get(name, ModuleRecord(resource=module.resource)) for name, module in plan.modules.items()}


def cancelled_records(plan: Plan, records: Mapping[str, ModuleRecord], status: ExecutionStatus) -> dict[str, ModuleRecord]:
    """The ``cancelled`` records of the modules not yet final when the execution ends with ``status``."""
    reason = _CANCEL_REASONS.get(status, "cancelled")
    return {
        name: record.model_copy(update={"status": ModuleStatus.CANCELLED, "error": record.error or reason})
        for name, record in module_records(plan, records).items()
        if not record.status.final
    }


_CANCEL_REASONS = {
    ExecutionStatus.CANCELLED: "cancelled: the execution was cancelled",
    ExecutionStatus.FAILED: "cancelled: the execution failed before this module finished",
}


def program_outputs(plan: Plan, outputs: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The program's ``outputs`` resolved; keys whose sources did not succeed are left out.

    ``outputs`` maps module names (and ``"inputs"``) to their output mappings.
    """
    resolved: dict[str, Any] = {}
    for key, value in plan.outputs.items():
        if all(ref.source in outputs for ref in iter_refs(value)):
            resolved[key] = _resolve_output(value, outputs)
    return resolved


def _resolve_output(value: Any, outputs: Mapping[str, Mapping[str, Any]]) -> Any:
    if isinstance(value, list):
        return [_resolve_output(item, outputs) for item in value]
    if isinstance(value, dict):
        return {key: _resolve_output(item, outputs) for key, item in value.items()}
    ref = parse_ref(value) if isinstance(value, str) else None
    if ref is None:
        return value
    source = outputs[ref.source]
    return source if ref.field is None else source.get(ref.field)


def utcnow() -> datetime:
    return datetime.now(UTC)


def isoformat(moment: datetime) -> str:
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))
