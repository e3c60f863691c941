"""An execution's lifecycle in the state store: records, failure budget, finishing, outputs.

Used by workers (after each module and stage) and by clients (timeouts, cancel); finishing is
idempotent, so whoever gets there first publishes the one result. The execution's strategy is the
caller's business: a method that ends a module says so, and its caller tells the strategy.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from typing import Any

from billiard.exceptions import TimeLimitExceeded
from celery import states
from celery.backends.redis import RedisBackend

from dspex_celery import compensation_store
from dspex_celery.canvas import compensate_signature, task_id
from dspex_celery.plan import Plan
from dspex_celery.results import (
    CompensationRecord,
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
from dspex_celery.saga import compensates, compensation_order
from dspex_celery.state import FinishState, LuaStep, StateStore, finish_state

log = logging.getLogger(__name__)

#: Seconds after which a claim to finish that published nothing is taken over by a re-delivered task
#: (re-deliveries come after the broker's visibility timeout or a pool process's death).
FINISH_TAKEOVER_S = 1.0
#: A claim this old that published nothing is taken over by a waiting client: its worker died (or hangs).
CLIENT_TAKEOVER_S = 10.0
#: How often a waiting client looks for such a claim.
TAKEOVER_CHECK_S = 2.0


def failure_budget_exceeded(plan: Plan, records: dict[str, ModuleRecord]) -> bool:
    """True when more modules failed than the program's failure tolerance allows."""
    limit = plan.max_failures()
    failed = sum(record.status is ModuleStatus.FAILED for record in records.values())
    return limit is not None and failed > limit


def lost_reason(error: object) -> str:
    """The record error of a task that failed outside the module call."""
    if isinstance(error, TimeLimitExceeded):
        return f"ModuleTimeout: killed by the hard time limit ({error.args[0] if error.args else '?'} s)"
    if isinstance(error, BaseException):
        return f"{type(error).__name__}: {error} (the task failed outside the module call)"
    return "the task ended without recording an outcome (its process was killed?)"


def _compensations(store: StateStore, execution_id: str,
                   read: FinishState | None) -> dict[str, CompensationRecord]:
    """The execution's compensations, from ``read`` when the finish claim read them."""
    if read is None:
        return compensation_store.records(store, execution_id)
    return {name: CompensationRecord.model_validate_json(raw) for name, raw in read.compensations.items()}


def timeout_message(timeout_s: float | None) -> str:
    return f"timed out: the execution did not finish within its timeout of {timeout_s or 0:g} s"


class Execution:
    """One stored execution: its runtime, its id and its plan (read from the store once, when first
    needed; ``plan_digest``: its text's digest, when a task message named it). Short-lived: made per
    task or client call, so it holds nothing that changes."""

    __slots__ = ("runtime", "id", "_plan", "_plan_read", "_plan_digest")

    def __init__(self, runtime: Runtime, execution_id: str, plan: Plan | None = None,
                 plan_digest: str | None = None) -> None:
        self.runtime = runtime
        self.id = execution_id
        self._plan = plan
        self._plan_read = plan is not None
        self._plan_digest = plan_digest

    def __repr__(self) -> str:
        return f"Execution({self.id!r})"

    @property
    def store(self) -> StateStore:
        return self.runtime.store

    @property
    def plan(self) -> Plan | None:
        """The plan; None when the execution is unknown or expired."""
        if not self._plan_read:
            self._plan, self._plan_read = self.runtime.store.plan(self.id, self._plan_digest), True
        return self._plan

    def require_plan(self) -> Plan:
        """The plan, which must exist (a worker acting on a module of this execution)."""
        plan = self.plan
        if plan is None:
            raise LookupError(f"execution {self.id} has no plan in the state store")
        return plan

    # --- module records -----------------------------------------------------------------------

    def write_record(self, module: str, record: ModuleRecord, attempt: bool = False) -> None:
        """Store a module record (``attempt``: it ends an attempt, which is logged) and tell the hooks."""
        self.runtime.write_record(self.id, module, record, attempt)

    def skip(self, name: str, parent: str, parent_status: str) -> None:
        """Record ``name`` as skipped because its ``parent`` ended ``parent_status``."""
        record = ModuleRecord(
            status=ModuleStatus.SKIPPED,
            error=f"skipped: upstream module '{parent}' {parent_status}",
            resource=self.require_plan().modules[name].resource,
        )
        self.write_record(name, record)

    def fail_module(self, name: str, record: ModuleRecord) -> None:
        """Write a final ``failed`` record (ending an attempt), then :meth:`module_failed`."""
        self.write_record(name, record, attempt=True)
        self.module_failed(name)

    def module_failed(self, name: str) -> None:
        """After a module's final ``failed`` record: fail the execution when that is one failure too
        many for its ``failure_tolerance``. The caller tells the strategy next."""
        plan = self.plan
        if plan is not None and self._over_budget(plan):
            self.finish(ExecutionStatus.FAILED)

    def _over_budget(self, plan: Plan) -> bool:
        limit = plan.max_failures()
        if limit is None or limit == 0:  # tolerant: never; strict: this failure is one too many
            return limit == 0
        return failure_budget_exceeded(plan, self.store.records(self.id))

    def settle_lost(self, name: str, error: str) -> bool:
        """Fail a module whose task ended without a final record (hard time limit, crash); True
        when it did (the caller tells the strategy).

        Idempotent: a module that is already final, or an execution that already ended, is left alone;
        so is a module the execution's plan does not have.
        """
        plan = self.plan
        if plan is None or name not in plan.modules:  # expired, or a stray message: nothing to settle
            return False
        record = self.store.record(self.id, name)
        if record.status.final or self.store.is_finished(self.id):
            return False
        now = utcnow()
        duration = (now - parse_time(record.started_at)).total_seconds() if record.started_at else None
        failed = record.model_copy(update={
            "status": ModuleStatus.FAILED,
            "error": error,
            "finished_at": isoformat(now),
            "duration_s": round(duration, 6) if duration is not None else None,
        })
        self.fail_module(name, failed)
        return True

    def settle_stage(self, names: list[str]) -> list[str]:
        """After a stage's chord returned: fail its modules that never wrote a final record; returns
        the modules it failed."""
        records = self.store.records_of(self.id, names)
        settled = []
        for name in names:
            record = records.get(name)
            if record is not None and not record.status.final:
                outcome = self.runtime.app.AsyncResult(task_id(self.id, name)).result
                if self.settle_lost(name, lost_reason(outcome)):
                    settled.append(name)
        return settled

    # --- ending -------------------------------------------------------------------------------

    def deadline_passed(self, meta: dict[str, Any] | None = None) -> bool:
        """End the execution as failed when its ``timeout`` (submit_program / ``--timeout``) is over."""
        meta = self.store.meta(self.id) if meta is None else meta
        deadline = meta.get("deadline")
        if deadline is None or time.time() < deadline:
            return False
        self.finish(ExecutionStatus.FAILED, timeout_message(meta.get("timeout_s")))
        return True

    def finish(self, status: ExecutionStatus, error: str | None = None, claimed: Sequence[Any] | None = None) -> bool:
        """Publish the execution's result once; modules not yet final become ``cancelled``. The claim
        and the reads of what the result is made of are one round trip (when the plan is known), or
        none: ``claimed`` is the reply of a :meth:`finish_claim_step` a strategy's script ran."""
        plan = self.plan
        if plan is None:
            if not self.store.claim_finish(self.id, status.value, error):
                return False
            return self._publish(status, error)
        if claimed is None:
            state = self.store.claim_finish_reading(self.id, status.value, error, list(plan.modules),
                                                    compensation_store.keys(self.store, self.id))
        else:
            state = finish_state(claimed, plan.modules)
        if state is None:
            return False
        return self._publish(status, error, None if state.gone else state)

    def finish_claim_step(self, status: ExecutionStatus) -> LuaStep:
        """The finish claim of :meth:`finish`, as Lua for a strategy's own script (not on a Redis
        Cluster: the live set is in another slot)."""
        return self.store.claim_finish_step(self.id, status.value, None, compensation_store.keys(self.store, self.id))

    def finish_abandoned(self, meta: dict[str, Any], older_than: float = FINISH_TAKEOVER_S) -> bool:
        """Publish the result of an execution whose finisher died between its claim and the publication.

        Called by a task that came back after its worker died, and by a waiting client (``meta``: the
        execution's meta as the caller read it): the claim says how the execution ended, and a claim older
        than ``older_than`` seconds without a published status is not being worked on any more.
        """
        if ExecutionStatus(meta.get("status", ExecutionStatus.RUNNING.value)).final:
            return False
        claim = self.store.finish_claim(self.id)
        if claim is None or time.time() - float(claim.get("at", 0)) < older_than:
            return False
        log.warning("execution %s: its finisher died before publishing the result; publishing it now", self.id)
        return self._publish(ExecutionStatus(claim["status"]), claim.get("error"))

    def publish_abandoned(self) -> bool:
        """A waiting client's :meth:`finish_abandoned` (workers do it too, but only once the dead
        worker's task comes back, after the broker's visibility timeout)."""
        meta = self.store.meta(self.id)
        return bool(meta) and self.finish_abandoned(meta, older_than=CLIENT_TAKEOVER_S)

    def _publish(self, status: ExecutionStatus, error: str | None, read: FinishState | None = None) -> bool:
        """Assemble and publish the result (Celery result, then the meta status that marks it published);
        ``read``: the execution's state as the finish claim read it (else it is read here)."""
        store, plan = self.store, self.plan
        if plan is None or (read is None and not store.exists(self.id)):  # the plan may be cached: ask the store
            log.warning("execution %s: its state is gone (expired, or Redis restarted without persistence): "
                        "no result published", self.id)
            return False
        result = self.result(status, error, cancel_open=True, read=read)
        order = compensation_order(plan, result.modules) if compensates(status) else []
        created = compensation_store.create(store, self.id, order)
        if created:
            result = result.model_copy(update={"compensations": compensation_store.records(store, self.id)})
        self._store_result(result)
        self._revoke_open(result)
        self.runtime.hooks.on_execution_finished(result)
        if created:
            self.compensate(order)
        return True

    def _store_result(self, result: ExecutionResult) -> None:
        """The Celery result, then the meta status that marks it published: one script when the
        result backend is this store's Redis (not a Redis Cluster, where they are in other slots),
        with the hooks' publish steps (e.g. the history's finished event) in it."""
        backend, store = self.runtime.app.backend, self.store
        if not isinstance(backend, RedisBackend) or store.clustered or self.runtime.settings.embedded:
            backend.store_result(self.id, result.to_json_dict(), states.SUCCESS)
            store.update_meta(self.id, status=result.status.value, finished_at=result.finished_at)
            return
        meta = backend._get_result_meta(result=result.to_json_dict(), state=states.SUCCESS, traceback=None,
                                        request=None)
        meta["task_id"] = self.id
        steps = self.runtime.hooks.publish_steps(result)
        try:
            store.publish_result(self.id, backend.get_key_for_task(self.id).decode(), backend.encode(meta),
                                 int(backend.expires or 0), steps, status=result.status.value,
                                 finished_at=result.finished_at)
        except Exception:
            self.runtime.hooks.publish_failed(result)
            raise

    def compensate(self, order: list[str]) -> None:
        """Send the chain of compensations of ``order`` (each task runs one, then sends the rest)."""
        signature = compensate_signature(self.runtime.app, self.require_plan(), self.id, order,
                                         self.runtime.settings.namespace, uuid.uuid4().hex[:12])
        signature.apply_async(ignore_result=True)

    def result(self, status: ExecutionStatus, error: str | None = None, *,
               cancel_open: bool = False, read: FinishState | None = None) -> ExecutionResult:
        """The execution's result from the store, or from what ``read`` read of it (``cancel_open``
        marks unfinished modules cancelled)."""
        store, plan = self.store, self.require_plan()
        meta = store.meta(self.id) if read is None else read.meta
        records = store.records(self.id) if read is None else read.records
        if cancel_open:
            cancelled = cancelled_records(plan, records, status)
            for name, record in cancelled.items():
                self.write_record(name, record)
            records = {**records, **cancelled}
        finished_at = (meta.get("finished_at") or isoformat(utcnow())) if status.final else None
        outputs = store.outputs(self.id, plan.modules) if read is None else read.outputs
        result = build_result(self.id, plan, meta, records, outputs, status, error, finished_at)
        compensations = _compensations(store, self.id, read) if status.final else {}
        return result.model_copy(update={"compensations": compensations}) if compensations else result

    def _revoke_open(self, result: ExecutionResult) -> None:
        """Revoke the Celery tasks of modules that were still pending or running."""
        open_ids = [
            task_id(self.id, name)
            for name, record in result.modules.items()
            if record.status is ModuleStatus.CANCELLED
        ]
        if open_ids and not self.runtime.settings.embedded:
            self.runtime.app.control.revoke(open_ids, terminate=True, signal="SIGTERM")
