"""The engine's Celery tasks: run one module (on a resource-class worker) and advance a stage."""

from __future__ import annotations

import logging
import time
from typing import Any

from billiard.exceptions import SoftTimeLimitExceeded
from celery import Celery, Task
from celery.utils.time import get_exponential_backoff_interval

from dspex_celery.canvas import ADVANCE, RUN_MODULE
from dspex_celery.errors import ModuleTimeout, TransientError
from dspex_celery.execution import failure_budget_exceeded, finish, write_record
from dspex_celery.graph import resolve_uses
from dspex_celery.hooks import ModuleContext
from dspex_celery.integrations.dspy import is_lm_transient
from dspex_celery.plan import ModulePlan, Plan
from dspex_celery.results import ExecutionStatus, ModuleRecord, ModuleStatus, isoformat, utcnow
from dspex_celery.runner import check_allowed, load_callable, normalize_output, resolve_inputs
from dspex_celery.runtime import Runtime, runtime_of

log = logging.getLogger(__name__)

BUILTIN_TRANSIENT: tuple[type[BaseException], ...] = (TransientError, ConnectionError, TimeoutError)


def register_tasks(app: Celery) -> None:
    """Register the engine's tasks on ``app``."""

    @app.task(name=RUN_MODULE, bind=True, shared=False, max_retries=None, acks_late=True, reject_on_worker_lost=True)
    def run_module(self: Task, execution_id: str, module: str, program: str | None = None) -> dict[str, Any]:
        return ModuleRun(self, runtime_of(self.app), execution_id, module).run()

    @app.task(name=ADVANCE, bind=True, shared=False, acks_late=True, reject_on_worker_lost=True)
    def advance(self: Task, execution_id: str, strategy: str, stage: int) -> None:
        from dspex_celery.strategies.levels import advance_execution

        advance_execution(runtime_of(self.app), execution_id, strategy, stage)


class ModuleRun:
    """One attempt of one module on a worker."""

    def __init__(self, task: Task, runtime: Runtime, execution_id: str, name: str) -> None:
        self.task = task
        self.runtime = runtime
        self.store = runtime.store
        self.execution_id = execution_id
        self.name = name

    def run(self) -> dict[str, Any]:
        plan = self.store.plan(self.execution_id)
        if plan is None:
            log.warning("execution %s is unknown or expired; dropping %s", self.execution_id, self.name)
            return {"module": self.name, "status": "expired"}
        previous = self.store.record(self.execution_id, self.name)
        if previous.status.final:
            return {"module": self.name, "status": previous.status.value}
        if self.store.is_finished(self.execution_id):
            return {"module": self.name, "status": ModuleStatus.CANCELLED.value}
        ctx = self._start(plan, previous)
        try:
            self.runtime.hooks.before_module(ctx)
            output = self._call(ctx.module, plan)
        except Exception as exc:  # a module may raise anything; each becomes a record
            return self._failed(ctx, _as_timeout(exc))
        finally:
            self.runtime.hooks.after_module(ctx)
        return self._succeeded(ctx, output)

    def _start(self, plan: Plan, previous: ModuleRecord) -> ModuleContext:
        started = utcnow()
        record = ModuleRecord(
            status=ModuleStatus.RUNNING,
            attempts=previous.attempts + 1,
            started_at=isoformat(started),
            worker=self.task.request.hostname,
            resource=plan.modules[self.name].resource,
        )
        write_record(self.runtime, self.execution_id, self.name, record)
        return ModuleContext(
            runtime=self.runtime,
            execution_id=self.execution_id,
            plan=plan,
            module=plan.modules[self.name],
            attempt=record.attempts,
            worker=record.worker or "",
            started_at=started,
            record=record,
        )

    def _call(self, module: ModulePlan, plan: Plan) -> dict[str, Any]:
        check_allowed(module, self.runtime.allowed_packages)
        function = load_callable(module)
        program_inputs = self.store.meta(self.execution_id).get("inputs", {})
        upstream = self.store.outputs(self.execution_id, module.parents)
        return normalize_output(module, function(**resolve_inputs(module, program_inputs, upstream)))

    def _finished_record(self, ctx: ModuleContext, **changes: Any) -> ModuleRecord:
        finished = utcnow()
        duration = (finished - ctx.started_at).total_seconds()
        return ctx.record.model_copy(
            update={"finished_at": isoformat(finished), "duration_s": round(duration, 6), **changes}
        )

    def _succeeded(self, ctx: ModuleContext, output: dict[str, Any]) -> dict[str, Any]:
        self.store.put_output(self.execution_id, self.name, output)
        record = self._finished_record(ctx, status=ModuleStatus.SUCCEEDED)
        write_record(self.runtime, self.execution_id, self.name, record)
        self.runtime.hooks.after_success(ctx, output)
        self._notify_strategy(record.status)
        return {"module": self.name, "status": record.status.value}

    def _failed(self, ctx: ModuleContext, error: Exception) -> dict[str, Any]:
        policy = ctx.module.retry_policy
        message = f"{type(error).__name__}: {error}"
        will_retry = is_transient(error, ctx.module) and ctx.attempt < policy.max_attempts
        status = ModuleStatus.RETRYING if will_retry else ModuleStatus.FAILED
        record = self._finished_record(ctx, status=status, error=message)
        write_record(self.runtime, self.execution_id, self.name, record)
        self.runtime.hooks.after_failure(ctx, error, will_retry)
        if will_retry:
            raise self.task.retry(countdown=self._backoff(ctx), exc=error, max_retries=None)
        self._fail_execution_if_over_budget(ctx.plan)
        self._notify_strategy(record.status)
        return {"module": self.name, "status": record.status.value}

    def _notify_strategy(self, status: ModuleStatus) -> None:
        from dspex_celery.strategies import get_strategy

        strategy = self.store.meta(self.execution_id).get("strategy", "levels")
        get_strategy(strategy).module_finished(self.runtime, self.execution_id, self.name, status)

    def _backoff(self, ctx: ModuleContext) -> float:
        """Exponential backoff with full jitter, never beyond the broker's visibility timeout."""
        policy = ctx.module.retry_policy
        ceiling = min(policy.max_backoff_s, self.runtime.settings.visibility_timeout_s / 2)
        if policy.backoff_s <= 0:
            return 0.0
        # Celery's helper works in whole-ish seconds; scale so sub-second factors keep precision.
        scale = 1000.0
        delay = get_exponential_backoff_interval(
            factor=policy.backoff_s * scale,
            retries=ctx.attempt - 1,
            maximum=ceiling * scale,
            full_jitter=policy.jitter,
        )
        return float(delay) / scale

    def _fail_execution_if_over_budget(self, plan: Plan) -> None:
        if failure_budget_exceeded(plan, self.store.records(self.execution_id)):
            finish(self.runtime, self.execution_id, ExecutionStatus.FAILED)


def _as_timeout(error: Exception) -> Exception:
    if isinstance(error, SoftTimeLimitExceeded):
        return ModuleTimeout("the module ran longer than its timeout_s")
    return error


def is_transient(error: BaseException, module: ModulePlan) -> bool:
    """Transient errors are retried: built-in ones and the classes named in ``retry.on``."""
    extra = tuple(_error_class(path) for path in module.retry_policy.on)
    if isinstance(error, BUILTIN_TRANSIENT + tuple(cls for cls in extra if cls is not None)):
        return True
    return is_lm_transient(error)  # DSPy integration: LM rate limits, overload, connection errors


def _error_class(path: str) -> type[BaseException] | None:
    try:
        target = resolve_uses(path)
    except ImportError:
        log.warning("retry.on names %s, which cannot be imported; ignoring it", path)
        return None
    return target if isinstance(target, type) and issubclass(target, BaseException) else None
