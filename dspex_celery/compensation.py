"""``dspex.compensate`` on a worker: run one module's compensation, then send the next (a chain).

Called ``compensate(inputs=..., output=...)`` with the module's inputs as they were resolved (program
inputs and its parents' outputs) and its output. Each compensation is claimed atomically in the state
store (:mod:`compensation_store`): one that succeeded never runs again, whoever sends it; one whose
worker died (kill -9: the message is re-delivered, acks_late) runs again, so compensations should be
idempotent. Any error is retried up to the module's ``retry.max_attempts`` with its backoff; a
compensation that still fails is recorded ``failed`` (``dspex-celery compensate ID`` runs it again) and
the chain goes on with the next one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, cast

from celery import Task

from dspex_celery import compensation_store
from dspex_celery.errors import ModuleNotAllowed
from dspex_celery.execution import Execution
from dspex_celery.graph import UsesRefused, is_allowed, is_method_name, resolve_uses
from dspex_celery.integrations.dspy_worker import DspyCall
from dspex_celery.plan import ModulePlan
from dspex_celery.results import (
    CompensationRecord,
    CompensationStatus,
    ExecutionStatus,
    isoformat,
    parse_time,
    utcnow,
)
from dspex_celery.runner import backoff_delay, check_allowed, load_callable, resolve_inputs
from dspex_celery.runtime import Runtime

log = logging.getLogger(__name__)

#: A compensation whose worker process died this many times is recorded failed, not run again.
MAX_LOST_ATTEMPTS = 3


class CompensationRun:
    """The compensation of ``order[0]`` in one execution, then the chain's next message."""

    def __init__(self, task: Task, runtime: Runtime, execution_id: str, order: list[str]) -> None:
        self.task = task
        self.runtime = runtime
        self.execution = Execution(runtime, execution_id)
        self.name, self.rest = order[0], list(order[1:])

    def run(self) -> dict[str, Any]:
        plan = self.execution.plan
        if plan is None or self.name not in plan.modules:
            log.warning("execution %s: no module %r to compensate (expired?); dropping", self.execution.id, self.name)
            return {"module": self.name, "status": "unknown"}
        claim = compensation_store.claim(self.runtime.store, self.execution.id, self.name, self.task.request.id,
                                         self.task.request.hostname or "", isoformat(utcnow()))
        if claim.verdict == "busy":  # another chain's task holds it; that chain goes on from there
            return {"module": self.name, "status": "running elsewhere"}
        if claim.verdict == "run":
            self._attempt(plan.modules[self.name], claim.record)
        self._send_rest()
        return {"module": self.name, "status": self._status()}

    def _attempt(self, module: ModulePlan, record: CompensationRecord) -> None:
        if record.lost_attempts >= MAX_LOST_ATTEMPTS:
            self._save(record, CompensationStatus.FAILED, f"WorkerLost: its worker process died "
                       f"{record.lost_attempts} times (killed or out of memory); not running it again")
            return
        if record.lost_attempts:
            log.warning("compensation of %s in %s: running again after its worker was lost", self.name,
                        self.execution.id)
        try:
            self._call(module)
        except Exception as exc:  # a compensation may raise anything; each becomes its record
            self._failed(module, record, exc)
            return
        self._save(record, CompensationStatus.SUCCEEDED, None)

    def _call(self, module: ModulePlan) -> None:
        store, execution_id = self.runtime.store, self.execution.id
        function = load_compensation(module, self.runtime.allowed_packages)
        outputs = store.outputs(execution_id, [*module.parents, module.name])
        inputs = resolve_inputs(module, store.meta_field(execution_id, "inputs", {}), outputs)
        function(inputs=inputs, output=outputs.get(module.name, {}))

    def _failed(self, module: ModulePlan, record: CompensationRecord, error: Exception) -> None:
        policy = module.retry_policy
        message = f"{type(error).__name__}: {error}"
        if record.attempts >= policy.max_attempts:
            log.warning("compensation of %s in %s failed: %s", self.name, self.execution.id, message)
            self._save(record, CompensationStatus.FAILED, message)
            return
        self._save(record, CompensationStatus.RETRYING, message)
        countdown = backoff_delay(policy, record.attempts, self.runtime.settings.visibility_timeout_s)
        raise self.task.retry(countdown=countdown, exc=error, max_retries=None)

    def _save(self, record: CompensationRecord, status: CompensationStatus, error: str | None) -> None:
        finished = utcnow()
        started = parse_time(record.started_at) if record.started_at else finished
        final = record.model_copy(update={"status": status, "error": error, "finished_at": isoformat(finished),
                                          "duration_s": round((finished - started).total_seconds(), 6)})
        compensation_store.save(self.runtime.store, self.execution.id, self.name, final)
        if status is not CompensationStatus.RETRYING:
            self._tell_hooks()

    def _tell_hooks(self) -> None:
        """The execution's result with its compensations now (history records them)."""
        status = ExecutionStatus(self.runtime.store.meta_field(self.execution.id, "status", "failed"))
        if status.final:
            self.runtime.hooks.on_compensation(self.execution.result(status))

    def _status(self) -> str:
        return compensation_store.records(self.runtime.store, self.execution.id).get(
            self.name, CompensationRecord()).status.value

    def _send_rest(self) -> None:
        if self.rest:
            self.execution.compensate(self.rest)


def load_compensation(module: ModulePlan, allowed: tuple[str, ...]) -> Callable[..., Any]:
    """The module's ``compensate`` function, only from the worker's allow-listed packages; a method
    name is that method of the module's instance (the one its calls use: ``with:``, ``state:``, and
    inside ``dspy.context`` with the module's LM)."""
    target = module.compensate or ""
    if is_method_name(target):
        check_allowed(module, allowed)
        try:  # the method, as a uses path, must be one the class defines (no '__' name, nothing inherited
            resolve_uses(f"{module.uses}.{target}", allowed)  # from outside the allowed packages)
        except UsesRefused as exc:
            raise ModuleNotAllowed(f"module '{module.name}': compensate '{target}' is refused: {exc}") from exc
        except ImportError as exc:
            raise ModuleNotAllowed(f"module '{module.name}': compensate '{target}' is no method of "
                                   f"'{module.uses}' ({exc})") from exc
        instance = load_callable(module)
        method = getattr(getattr(instance, "__wrapped__", instance), target)
        return DspyCall(method, instance.settings) if isinstance(instance, DspyCall) else cast(Callable[..., Any], method)
    if not is_allowed(target, allowed):
        raise ModuleNotAllowed(f"module '{module.name}': compensate '{target}' is not allowed on this worker "
                               f"(allow-listed packages: {', '.join(allowed) or 'none'})")
    try:
        return resolve_uses(target, allowed)
    except UsesRefused as exc:
        raise ModuleNotAllowed(f"module '{module.name}': compensate '{target}' is refused: {exc}") from exc


