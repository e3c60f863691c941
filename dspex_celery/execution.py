"""An execution's lifecycle in the state store: records, failure budget, finishing, outputs.

Used by workers (after each module and stage) and by clients (timeouts, cancel); finishing is
idempotent, so whoever gets there first publishes the one result.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import states

from dspex_celery.plan import Plan
from dspex_celery.results import (
    ExecutionResult,
    ExecutionStatus,
    ModuleRecord,
    ModuleStatus,
    isoformat,
    utcnow,
)
from dspex_celery.runtime import Runtime
from dspex_celery.spec import iter_refs, parse_ref

log = logging.getLogger(__name__)

BLOCKING = (ModuleStatus.FAILED, ModuleStatus.SKIPPED, ModuleStatus.CANCELLED)


def write_record(runtime: Runtime, execution_id: str, module: str, record: ModuleRecord) -> None:
    """Store a module record and tell the hooks."""
    runtime.store.put_record(execution_id, module, record)
    runtime.hooks.on_record(execution_id, module, record)


def failure_budget_exceeded(plan: Plan, records: dict[str, ModuleRecord]) -> bool:
    """True when more modules failed than the program's failure tolerance allows."""
    limit = plan.max_failures()
    failed = sum(record.status is ModuleStatus.FAILED for record in records.values())
    return limit is not None and failed > limit


def blocked_by(plan: Plan, name: str, records: dict[str, ModuleRecord]) -> str | None:
    """The first parent that failed, was skipped or cancelled (so ``name`` cannot run)."""
    for parent in plan.modules[name].parents:
        if parent in records and records[parent].status in BLOCKING:
            return parent
    return None


def skip(runtime: Runtime, execution_id: str, name: str, parent: str, parent_status: str) -> None:
    record = ModuleRecord(
        status=ModuleStatus.SKIPPED,
        error=f"skipped: upstream module '{parent}' {parent_status}",
        resource=runtime.store.plan(execution_id).modules[name].resource,  # type: ignore[union-attr]
    )
    write_record(runtime, execution_id, name, record)


def finish(runtime: Runtime, execution_id: str, status: ExecutionStatus, error: str | None = None) -> bool:
    """Publish the execution's result once; modules not yet final become ``cancelled``."""
    store = runtime.store
    if not store.claim_finish(execution_id):
        return False
    plan = store.plan(execution_id)
    if plan is None:
        log.warning("execution %s expired before it finished", execution_id)
        return False
    result = assemble_result(runtime, execution_id, plan, status, error, cancel_open=True)
    store.update_meta(execution_id, status=result.status.value, finished_at=result.finished_at)
    runtime.app.backend.store_result(execution_id, result.to_json_dict(), states.SUCCESS)
    revoke_open(runtime, execution_id, plan, result)
    runtime.hooks.on_execution_finished(result)
    return True


def assemble_result(
    runtime: Runtime,
    execution_id: str,
    plan: Plan,
    status: ExecutionStatus,
    error: str | None = None,
    *,
    cancel_open: bool = False,
) -> ExecutionResult:
    """The execution's result from the store (``cancel_open`` marks unfinished modules cancelled)."""
    store = runtime.store
    meta = store.meta(execution_id)
    records = store.records(execution_id)
    modules = {name: records.get(name, ModuleRecord(resource=plan.modules[name].resource)) for name in plan.modules}
    if cancel_open:
        for name, record in modules.items():
            if not record.status.final:
                modules[name] = _cancelled(record, status)
                write_record(runtime, execution_id, name, modules[name])
    failed = [name for name, record in modules.items() if record.status is ModuleStatus.FAILED]
    if error is None and failed and status is ExecutionStatus.FAILED:
        error = modules[failed[0]].error
    return ExecutionResult(
        execution_id=execution_id,
        program=plan.program,
        strategy=meta.get("strategy", "levels"),
        status=status,
        outputs=program_outputs(plan, {"inputs": meta.get("inputs", {}), **store.outputs(execution_id, plan.modules)}),
        modules=modules,
        failed_modules=failed,
        error=error,
        submitted_at=meta.get("submitted_at"),
        finished_at=isoformat(utcnow()) if status.final else None,
        resumed_from=meta.get("resumed_from"),
    )


def _cancelled(record: ModuleRecord, status: ExecutionStatus) -> ModuleRecord:
    reason = {
        ExecutionStatus.CANCELLED: "cancelled: the execution was cancelled",
        ExecutionStatus.FAILED: "cancelled: the execution failed before this module finished",
    }.get(status, "cancelled")
    return record.model_copy(update={"status": ModuleStatus.CANCELLED, "error": record.error or reason})


def revoke_open(runtime: Runtime, execution_id: str, plan: Plan, result: ExecutionResult) -> None:
    """Revoke the Celery tasks of modules that were still pending or running."""
    from dspex_celery.canvas import task_id

    open_ids = [
        task_id(execution_id, name)
        for name, record in result.modules.items()
        if record.status is ModuleStatus.CANCELLED
    ]
    if open_ids and not runtime.settings.embedded:
        runtime.app.control.revoke(open_ids, terminate=True, signal="SIGTERM")


def program_outputs(plan: Plan, outputs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The program's ``outputs`` resolved; keys whose sources did not succeed are left out.

    ``outputs`` maps module names (and ``"inputs"``) to their output mappings.
    """
    resolved: dict[str, Any] = {}
    for key, value in plan.outputs.items():
        if all(ref.source in outputs for ref in iter_refs(value)):
            resolved[key] = _resolve_output(value, outputs)
    return resolved


def _resolve_output(value: Any, outputs: dict[str, dict[str, Any]]) -> Any:
    if isinstance(value, list):
        return [_resolve_output(item, outputs) for item in value]
    if isinstance(value, dict):
        return {key: _resolve_output(item, outputs) for key, item in value.items()}
    ref = parse_ref(value) if isinstance(value, str) else None
    if ref is None:
        return value
    source = outputs[ref.source]
    return source if ref.field is None else source.get(ref.field)
