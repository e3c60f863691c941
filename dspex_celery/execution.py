"""An execution's lifecycle in the state store: records, failure budget, finishing, outputs.

Used by workers (after each module and stage) and by clients (timeouts, cancel); finishing is
idempotent, so whoever gets there first publishes the one result.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from billiard.exceptions import TimeLimitExceeded
from celery import states

from dspex_celery.plan import Plan
from dspex_celery.results import (
    ExecutionResult,
    ExecutionStatus,
    ModuleRecord,
    ModuleStatus,
    build_result,
    cancelled_records,
    isoformat,
    parse_time,
    utcnow,
)
from dspex_celery.runtime import Runtime

log = logging.getLogger(__name__)

BLOCKING = (ModuleStatus.FAILED, ModuleStatus.SKIPPED, ModuleStatus.CANCELLED)
#: Seconds after which a claim to finish that published nothing is taken over by a re-delivered task
#: (re-deliveries come after the broker's visibility timeout or a pool process's death).
FINISH_TAKEOVER_S = 1.0
#: A claim this old that published nothing is taken over by a waiting client: its worker died (or hangs).
CLIENT_TAKEOVER_S = 10.0
#: How often a waiting client looks for such a claim.
TAKEOVER_CHECK_S = 2.0


def write_record(runtime: Runtime, execution_id: str, module: str, record: ModuleRecord,
                 attempt: bool = False) -> None:
    """Store a module record (``attempt``: it ends an attempt, which is logged) and tell the hooks."""
    runtime.store.put_record(execution_id, module, record, attempt)
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


def notify_strategy(runtime: Runtime, execution_id: str, name: str, status: ModuleStatus,
                    strategy: str | None = None) -> None:
    """Tell the execution's strategy (read from its meta unless given) that ``name`` reached a final status."""
    from dspex_celery.strategies import get_strategy

    strategy = strategy or runtime.store.meta_field(execution_id, "strategy", "levels")
    get_strategy(strategy).module_finished(runtime, execution_id, name, status)


def fail_module(runtime: Runtime, execution_id: str, name: str, record: ModuleRecord) -> None:
    """Write a final ``failed`` record (ending an attempt), then :func:`module_failed`."""
    write_record(runtime, execution_id, name, record, attempt=True)
    module_failed(runtime, execution_id, name)


def module_failed(runtime: Runtime, execution_id: str, name: str, strategy: str | None = None) -> None:
    """After a module's final ``failed`` record: fail the execution when that is one failure too
    many for its ``failure_tolerance``, and tell the strategy."""
    plan = runtime.store.plan(execution_id)
    if plan is not None and _over_budget(runtime, execution_id, plan):
        finish(runtime, execution_id, ExecutionStatus.FAILED)
    notify_strategy(runtime, execution_id, name, ModuleStatus.FAILED, strategy)


def _over_budget(runtime: Runtime, execution_id: str, plan: Plan) -> bool:
    limit = plan.max_failures()
    if limit is None or limit == 0:  # tolerant: never; strict: this failure is one too many
        return limit == 0
    return failure_budget_exceeded(plan, runtime.store.records(execution_id))


def settle_lost(runtime: Runtime, execution_id: str, name: str, error: str) -> bool:
    """Fail a module whose task ended without a final record (hard time limit, crash).

    Idempotent: a module that is already final, or an execution that already ended, is left alone;
    so is a module the execution's plan does not have.
    """
    store = runtime.store
    plan = store.plan(execution_id)
    if plan is None or name not in plan.modules:  # expired, or a stray message: nothing to settle
        return False
    record = store.record(execution_id, name)
    if record.status.final or store.is_finished(execution_id):
        return False
    now = utcnow()
    duration = (now - parse_time(record.started_at)).total_seconds() if record.started_at else None
    failed = record.model_copy(update={
        "status": ModuleStatus.FAILED,
        "error": error,
        "finished_at": isoformat(now),
        "duration_s": round(duration, 6) if duration is not None else None,
    })
    fail_module(runtime, execution_id, name, failed)
    return True


def settle_stage(runtime: Runtime, execution_id: str, names: list[str]) -> None:
    """After a stage's chord returned: fail its modules that never wrote a final record."""
    from dspex_celery.canvas import task_id

    records = runtime.store.records_of(execution_id, names)
    for name in names:
        record = records.get(name)
        if record is not None and not record.status.final:
            outcome = runtime.app.AsyncResult(task_id(execution_id, name)).result
            settle_lost(runtime, execution_id, name, lost_reason(outcome))


def lost_reason(error: object) -> str:
    """The record error of a task that failed outside the module call."""
    if isinstance(error, TimeLimitExceeded):
        return f"ModuleTimeout: killed by the hard time limit ({error.args[0] if error.args else '?'} s)"
    if isinstance(error, BaseException):
        return f"{type(error).__name__}: {error} (the task failed outside the module call)"
    return "the task ended without recording an outcome (its process was killed?)"


def deadline_passed(runtime: Runtime, execution_id: str, meta: dict[str, Any] | None = None) -> bool:
    """End the execution as failed when its ``timeout`` (submit_program / ``--timeout``) is over."""
    meta = runtime.store.meta(execution_id) if meta is None else meta
    deadline = meta.get("deadline")
    if deadline is None or time.time() < deadline:
        return False
    finish(runtime, execution_id, ExecutionStatus.FAILED, timeout_message(meta.get("timeout_s")))
    return True


def timeout_message(timeout_s: float | None) -> str:
    return f"timed out: the execution did not finish within its timeout of {timeout_s or 0:g} s"


def finish(runtime: Runtime, execution_id: str, status: ExecutionStatus, error: str | None = None) -> bool:
    """Publish the execution's result once; modules not yet final become ``cancelled``."""
    if not runtime.store.claim_finish(execution_id, status.value, error):
        return False
    return _publish(runtime, execution_id, status, error)


def finish_abandoned(runtime: Runtime, execution_id: str, meta: dict[str, Any],
                     older_than: float = FINISH_TAKEOVER_S) -> bool:
    """Publish the result of an execution whose finisher died between its claim and the publication.

    Called by a task that came back after its worker died, and by a waiting client (``meta``: the
    execution's meta as the caller read it): the claim says how the execution ended, and a claim older
    than ``older_than`` seconds without a published status is not being worked on any more.
    """
    if ExecutionStatus(meta.get("status", ExecutionStatus.RUNNING.value)).final:
        return False
    claim = runtime.store.finish_claim(execution_id)
    if claim is None or time.time() - float(claim.get("at", 0)) < older_than:
        return False
    log.warning("execution %s: its finisher died before publishing the result; publishing it now", execution_id)
    return _publish(runtime, execution_id, ExecutionStatus(claim["status"]), claim.get("error"))


def publish_abandoned(runtime: Runtime, execution_id: str) -> bool:
    """A waiting client's :func:`finish_abandoned` (workers do it too, but only once the dead worker's
    task comes back, after the broker's visibility timeout)."""
    meta = runtime.store.meta(execution_id)
    return bool(meta) and finish_abandoned(runtime, execution_id, meta, older_than=CLIENT_TAKEOVER_S)


def _publish(runtime: Runtime, execution_id: str, status: ExecutionStatus, error: str | None) -> bool:
    """Assemble and publish the result (Celery result, then the meta status that marks it published)."""
    store = runtime.store
    plan = store.plan(execution_id)
    if plan is None or not store.exists(execution_id):  # the plan may be cached: ask the store itself
        log.warning("execution %s: its state is gone (expired, or Redis restarted without persistence): "
                    "no result published", execution_id)
        return False
    result = assemble_result(runtime, execution_id, plan, status, error, cancel_open=True)
    runtime.app.backend.store_result(execution_id, result.to_json_dict(), states.SUCCESS)
    store.update_meta(execution_id, status=result.status.value, finished_at=result.finished_at)
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
    if cancel_open:
        cancelled = cancelled_records(plan, records, status)
        for name, record in cancelled.items():
            write_record(runtime, execution_id, name, record)
        records = {**records, **cancelled}
    finished_at = isoformat(utcnow()) if status.final else None
    outputs = store.outputs(execution_id, plan.modules)
    return build_result(execution_id, plan, meta, records, outputs, status, error, finished_at)


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
