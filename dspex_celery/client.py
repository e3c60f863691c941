"""Submitting programs and waiting for results: ``submit_program`` and ``ExecutionHandle``."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeout
from celery.result import AsyncResult

from dspex_celery import defaults
from dspex_celery.errors import ExecutionTimeout, InputError, UnknownExecution, UsageError
from dspex_celery.execution import assemble_result, finish
from dspex_celery.plan import STRATEGIES, Plan
from dspex_celery.program import Program
from dspex_celery.results import ExecutionResult, ExecutionStatus, ModuleRecord, isoformat, utcnow
from dspex_celery.routing import worker_queues
from dspex_celery.runtime import Runtime, default_runtime, runtime_of
from dspex_celery.spec import ProgramSpec
from dspex_celery.strategies import get_strategy, recommend_strategy

ProgramLike = Program | ProgramSpec | dict[str, Any] | str | Path


class ExecutionHandle:
    """A submitted execution: ask its status, wait for its result."""

    def __init__(self, runtime: Runtime, execution_id: str, timeout: float | None = None) -> None:
        self.runtime = runtime
        self.execution_id = execution_id
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"ExecutionHandle({self.execution_id!r})"

    def status(self) -> ExecutionStatus:
        meta = self.runtime.store.meta(self.execution_id)
        if not meta:
            raise UnknownExecution(f"unknown or expired execution '{self.execution_id}'")
        return ExecutionStatus(meta.get("status", ExecutionStatus.RUNNING.value))

    def records(self) -> dict[str, ModuleRecord]:
        """Current module records (while it runs, too)."""
        return self.runtime.store.records(self.execution_id)

    def get(self, timeout: float | None = None) -> ExecutionResult:
        """Wait for the result.

        With no ``timeout``, waits up to the submission's timeout and then ends the execution as
        failed (pending modules revoked). An explicit ``timeout`` only stops waiting:
        :class:`ExecutionTimeout` is raised and the execution goes on.
        """
        wait = timeout if timeout is not None else self.timeout
        try:
            data = AsyncResult(self.execution_id, app=self.runtime.app).get(
                timeout=wait, interval=defaults.EMBEDDED_POLL_S * 2, propagate=True, disable_sync_subtasks=False
            )
        except CeleryTimeout:
            if timeout is not None:
                raise ExecutionTimeout(
                    f"execution {self.execution_id} did not finish within {timeout:g} s"
                ) from None
            self._end_timed_out(wait)
            return self.get(timeout=30)
        return ExecutionResult.model_validate(data)

    def _end_timed_out(self, wait: float | None) -> None:
        finish(self.runtime, self.execution_id, ExecutionStatus.FAILED, f"timed out after {wait:g} s")

    def current(self) -> ExecutionResult:
        """A snapshot of the execution as it is now (outputs so far, module records)."""
        plan = self.runtime.store.plan(self.execution_id)
        if plan is None:
            raise UnknownExecution(f"unknown or expired execution '{self.execution_id}'")
        return assemble_result(self.runtime, self.execution_id, plan, self.status())


def submit_program(
    program: ProgramLike,
    inputs: dict[str, Any] | None = None,
    *,
    strategy: str | None = None,
    app: Celery | None = None,
    timeout: float | None = None,
    use_profile: bool = True,
) -> ExecutionHandle:
    """Validate ``program``, store its plan and dispatch it; returns at once with a handle.

    ``use_profile``: plan with the optimizer's profile of this program version, if history has one.
    """
    runtime = runtime_of(app) if app is not None else default_runtime()
    program = Program.coerce(program)
    plan = program.plan()
    if use_profile:
        from dspex_celery.optimizer import apply_profile

        plan = apply_profile(runtime.settings, program, plan)
    values = check_inputs(plan, inputs or {})
    chosen = choose_strategy(plan, strategy)
    prepare_runtime(runtime, program, plan)
    execution_id = uuid.uuid4().hex
    runtime.store.create(execution_id, plan, _meta(plan, chosen, values))
    get_strategy(chosen).start(runtime, execution_id)
    return ExecutionHandle(runtime, execution_id, timeout)


def _meta(plan: Plan, strategy: str, inputs: dict[str, Any]) -> dict[str, Any]:
    return {
        "program": plan.program,
        "fingerprint": plan.fingerprint,
        "strategy": strategy,
        "inputs": inputs,
        "status": ExecutionStatus.RUNNING.value,
        "submitted_at": isoformat(utcnow()),
    }


def check_inputs(plan: Plan, inputs: dict[str, Any]) -> dict[str, Any]:
    """The inputs, checked against the program's declared inputs and for JSON-ability."""
    missing = [name for name in plan.inputs if name not in inputs]
    if missing:
        flags = " ".join(f"-i {name}=VALUE" for name in missing)
        raise InputError(f"missing input{'s' if len(missing) > 1 else ''} {', '.join(missing)}: pass {flags}")
    unknown = [name for name in inputs if name not in plan.inputs]
    if unknown:
        declared = ", ".join(plan.inputs) or "no inputs"
        raise InputError(f"unknown input {', '.join(unknown)}: program '{plan.program}' takes {declared}")
    try:
        json.dumps(inputs)
    except (TypeError, ValueError) as exc:
        raise InputError(f"inputs must be JSON values ({exc})") from None
    return inputs


def choose_strategy(plan: Plan, requested: str | None) -> str:
    """The strategy to run with: the requested one, else the recommended one."""
    if requested is None:
        return recommend_strategy(plan)[0]
    if requested not in STRATEGIES:
        raise UsageError(f"unknown strategy '{requested}': choose one of {', '.join(STRATEGIES)}")
    return requested


def prepare_runtime(runtime: Runtime, program: Program, plan: Plan) -> None:
    """Embedded: allow the program's packages and consume its queues. Cluster: check reachability."""
    if not runtime.settings.embedded:
        runtime.check_reachable()
        return
    from dspex_celery.embedded import EmbeddedWorker

    runtime.allowed |= program.packages()
    resources = sorted({module.resource for module in plan.modules.values()})
    queues = worker_queues(runtime.settings.namespace, resources)
    if runtime.embedded_worker is None:
        runtime.embedded_worker = EmbeddedWorker(runtime.app, queues, runtime.settings.embedded_concurrency)
    else:
        runtime.embedded_worker.consume(queues)
