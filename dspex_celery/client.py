"""Submitting programs and waiting for results: ``submit_program`` and ``ExecutionHandle``."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeout
from celery.result import AsyncResult

from dspex_celery import defaults
from dspex_celery.canvas import hard_time_limit
from dspex_celery.errors import ConfigError, ExecutionTimeout, InputError, UnknownExecution, UsageError
from dspex_celery.execution import (
    TAKEOVER_CHECK_S,
    assemble_result,
    finish,
    publish_abandoned,
    timeout_message,
    write_record,
)
from dspex_celery.plan import STRATEGIES, ModulePlan, Plan
from dspex_celery.presence import warn_if_unserved
from dspex_celery.program import Program
from dspex_celery.results import ExecutionResult, ExecutionStatus, ModuleRecord, ModuleStatus, isoformat, utcnow
from dspex_celery.routing import worker_queues
from dspex_celery.runner import package_of
from dspex_celery.runtime import Runtime, default_runtime, runtime_of
from dspex_celery.spec import ProgramSpec
from dspex_celery.strategies import get_strategy, recommend_strategy

ProgramLike = Program | ProgramSpec | dict[str, Any] | str | Path

#: Seconds to wait for the result an execution publishes once it was ended (timeout, cancel).
ENDED_WAIT_S = 30.0


class ExecutionHandle:
    """A submitted execution: ask its status, wait for its result."""

    def __init__(self, runtime: Runtime, execution_id: str, timeout: float | None = None) -> None:
        self.runtime = runtime
        self.execution_id = execution_id
        self.timeout = timeout
        self._deadline = time.monotonic() + timeout if timeout is not None else None

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

        With no ``timeout``, waits until the submission's timeout (counted from submission) is
        over and then ends the execution as failed (pending modules revoked). An explicit
        ``timeout`` only stops waiting: :class:`ExecutionTimeout` is raised and the execution goes on.
        While it waits, a result whose finisher died after claiming it is published here.
        """
        wait = timeout if timeout is not None else self._remaining()
        give_up = None if wait is None else time.monotonic() + wait
        pending = AsyncResult(self.execution_id, app=self.runtime.app)
        while (left := None if give_up is None else give_up - time.monotonic()) is None or left > 0:
            try:
                data = pending.get(timeout=TAKEOVER_CHECK_S if left is None else min(left, TAKEOVER_CHECK_S),
                                   interval=defaults.EMBEDDED_POLL_S * 2, propagate=True,
                                   disable_sync_subtasks=False)
                return ExecutionResult.model_validate(data)
            except CeleryTimeout:
                if publish_abandoned(self.runtime, self.execution_id):
                    return self.get(timeout=ENDED_WAIT_S)
        if timeout is not None:
            raise ExecutionTimeout(f"execution {self.execution_id} did not finish within {timeout:g} s") from None
        finish(self.runtime, self.execution_id, ExecutionStatus.FAILED, timeout_message(self.timeout))
        return self.get(timeout=ENDED_WAIT_S)

    def _remaining(self) -> float | None:
        return None if self._deadline is None else max(0.001, self._deadline - time.monotonic())

    def cancel(self) -> ExecutionResult:
        """End the execution as ``cancelled``: pending modules are revoked and running ones
        terminated (prefork workers); an execution that already ended keeps its result."""
        self.status()  # unknown or expired: UnknownExecution
        cancel_execution(self.runtime, self.execution_id)
        return self.get(timeout=ENDED_WAIT_S)

    def current(self) -> ExecutionResult:
        """A snapshot of the execution as it is now (outputs so far, module records)."""
        plan = self.runtime.store.plan(self.execution_id)
        if plan is None:
            raise UnknownExecution(f"unknown or expired execution '{self.execution_id}'")
        return assemble_result(self.runtime, self.execution_id, plan, self.status())


def cancel_execution(runtime: Runtime, execution_id: str) -> bool:
    """End ``execution_id`` as ``cancelled`` (as ``dspex-celery cancel``) without waiting for anything:
    pending modules are revoked, running ones terminated. False when it had already ended."""
    return finish(runtime, execution_id, ExecutionStatus.CANCELLED, "cancelled on request")


def submit_program(
    program: ProgramLike,
    inputs: dict[str, Any] | None = None,
    *,
    strategy: str | None = None,
    app: Celery | None = None,
    timeout: float | None = None,
    use_profile: bool = True,
    resume_from: str | None = None,
    learned_timeouts: bool | None = None,
) -> ExecutionHandle:
    """Validate ``program``, store its plan and dispatch it; returns at once with a handle.

    ``use_profile``: plan with the optimizer's profile of this program version, if history has one.
    ``learned_timeouts``: also take its timeouts where the program sets none (None: the program's
    ``timeouts:`` key, else the ``learned_timeouts`` setting, decides; off by default).
    ``timeout``: seconds from now after which the execution ends as failed.
    ``resume_from``: an ended execution whose succeeded modules are reused (copied, ``reused: true``)
    when their definition and upstream are unchanged; ``inputs`` default to its inputs.
    """
    runtime = runtime_of(app) if app is not None else default_runtime()
    program = Program.coerce(program)
    plan = program.plan()
    if use_profile:
        from dspex_celery.optimizer import apply_profile

        plan = apply_profile(runtime.settings, program, plan, learned_timeouts=learned_timeouts)
    source = resume_source(runtime, resume_from) if resume_from else None
    if source is not None:
        inputs = source.same_inputs(inputs)
    values = check_inputs(plan, inputs or {})
    chosen = choose_strategy(plan, strategy)
    handle = launch(runtime, plan, program.packages(), values, chosen, timeout, source)
    warn_if_unserved(runtime, plan)
    return handle


def resume_execution(
    execution_id: str, *, app: Celery | None = None, strategy: str | None = None, timeout: float | None = None
) -> ExecutionHandle:
    """A new execution of an ended one's stored plan and inputs that reuses its succeeded modules."""
    runtime = runtime_of(app) if app is not None else default_runtime()
    source = resume_source(runtime, execution_id)
    chosen = choose_strategy(source.plan, strategy or source.meta.get("strategy"))
    packages = {package_of(module.uses) for module in source.plan.modules.values()}
    handle = launch(runtime, source.plan, packages, source.meta.get("inputs", {}), chosen, timeout, source)
    warn_if_unserved(runtime, source.plan)
    return handle


def launch(
    runtime: Runtime,
    plan: Plan,
    packages: set[str],
    inputs: dict[str, Any],
    strategy: str,
    timeout: float | None,
    source: ResumeSource | None = None,
    execution_id: str | None = None,
) -> ExecutionHandle:
    """Store a new execution (reused outputs first) and start its strategy.

    ``execution_id``: an id chosen (and journaled) by the caller beforehand; a fresh one otherwise.
    """
    check_visibility_timeout(runtime, plan)
    prepare_runtime(runtime, packages, plan)
    execution_id = execution_id or new_execution_id()
    runtime.store.create(execution_id, plan, _meta(plan, strategy, inputs, timeout, source))
    if source is not None:
        source.copy_reusable(runtime, plan, execution_id)
    start_execution(runtime, execution_id, strategy)
    return ExecutionHandle(runtime, execution_id, timeout)


def start_execution(runtime: Runtime, execution_id: str, strategy: str) -> None:
    """Dispatch a stored execution's first modules, then mark it ``started`` in its meta.

    The mark lets a batch re-run tell an execution its killed client stored but never started
    (start it) from one that runs (wait for it).
    """
    get_strategy(strategy).start(runtime, execution_id)
    runtime.store.update_meta(execution_id, started=True)


def new_execution_id() -> str:
    """A fresh execution id (also the Celery task id its result is stored under)."""
    return uuid.uuid4().hex


def _meta(
    plan: Plan, strategy: str, inputs: dict[str, Any], timeout: float | None, source: ResumeSource | None
) -> dict[str, Any]:
    return {
        "program": plan.program,
        "fingerprint": plan.fingerprint,
        "strategy": strategy,
        "inputs": inputs,
        "status": ExecutionStatus.RUNNING.value,
        "submitted_at": isoformat(utcnow()),
        "timeout_s": timeout,
        "deadline": time.time() + timeout if timeout is not None else None,  # workers end it too
        "resumed_from": source.execution_id if source is not None else None,
    }


# --- resume ---------------------------------------------------------------------------------------


@dataclass
class ResumeSource:
    """An ended execution to resume from: its plan, meta, records and outputs."""

    execution_id: str
    plan: Plan
    meta: dict[str, Any]
    records: dict[str, ModuleRecord]

    def same_inputs(self, inputs: dict[str, Any] | None) -> dict[str, Any]:
        """The inputs of the resumed execution: the original ones (passing others is an error)."""
        original: dict[str, Any] = self.meta.get("inputs", {})
        if inputs is not None and inputs != original:
            raise InputError(
                f"resume_from={self.execution_id} reuses outputs computed from its own inputs: pass the "
                "same inputs or none (submit without resume_from to run with new inputs)"
            )
        return original

    def reusable(self, plan: Plan) -> list[str]:
        """Modules that succeeded here, are defined the same in ``plan`` and whose upstream is reused."""
        reused: set[str] = set()
        for name in plan.topological_order():
            old, new, record = self.plan.modules.get(name), plan.modules[name], self.records.get(name)
            if (
                old is not None
                and record is not None
                and record.status is ModuleStatus.SUCCEEDED
                and _definition(old) == _definition(new)
                and all(parent in reused for parent in new.parents)
            ):
                reused.add(name)
        return [name for name in plan.topological_order() if name in reused]

    def copy_reusable(self, runtime: Runtime, plan: Plan, execution_id: str) -> None:
        """Copy outputs and records (marked ``reused``) of the reusable modules into the new execution."""
        names = self.reusable(plan)
        outputs = runtime.store.outputs(self.execution_id, names)
        for name in names:
            if name in outputs:
                runtime.store.put_output(execution_id, name, outputs[name])
                write_record(runtime, execution_id, name, self.records[name].model_copy(update={"reused": True}))


def _definition(module: ModulePlan) -> tuple[Any, ...]:
    """What a module computes from: equal definitions and equal upstream give equal outputs."""
    return (module.uses, module.inputs, module.depends_on, module.parents, module.with_, module.state,
            getattr(module, "dspy", None))


def resume_source(runtime: Runtime, execution_id: str) -> ResumeSource:
    """The ended execution ``execution_id``; unknown, expired or still running is a usage error."""
    store = runtime.store
    plan, meta = store.plan(execution_id), store.meta(execution_id)
    if plan is None or not meta:
        raise UnknownExecution(
            f"cannot resume '{execution_id}': unknown or expired execution (state is kept "
            f"{runtime.settings.state_ttl_s} s): check the id and the --result-backend it ran with"
        )
    if not store.is_finished(execution_id):
        raise UsageError(
            f"cannot resume '{execution_id}': it is still running; wait for it or cancel it first "
            f"(dspex-celery cancel {execution_id})"
        )
    return ResumeSource(execution_id, plan, meta, store.records(execution_id))


def check_visibility_timeout(runtime: Runtime, plan: Plan) -> None:
    """Redis re-delivers a message unacknowledged for ``visibility_timeout_s`` to another worker:
    a module allowed to run that long would run twice."""
    broker = runtime.settings.broker_url or ""
    if not broker.startswith(("redis://", "rediss://", "sqs://")):
        return
    limit = runtime.settings.visibility_timeout_s
    for module in plan.modules.values():
        if module.timeout_s and hard_time_limit(module.timeout_s) >= limit:
            raise ConfigError(
                f"module '{module.name}': timeout_s {module.timeout_s:g} s (killed at "
                f"{hard_time_limit(module.timeout_s):g} s) reaches the broker visibility timeout ({limit} s), "
                "after which a running module is re-delivered to another worker: raise "
                "visibility_timeout_s (DSPEX_VISIBILITY_TIMEOUT_S) above it or lower timeout_s"
            )


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
    from dspex_celery.spec import non_finite_input

    try:
        json.dumps(inputs, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise InputError(non_finite_input(inputs) or f"inputs must be JSON values ({exc})") from None
    return inputs


def choose_strategy(plan: Plan, requested: str | None) -> str:
    """The strategy to run with: the requested one, else the recommended one."""
    if requested is None:
        return recommend_strategy(plan)[0]
    if requested not in STRATEGIES:
        raise UsageError(f"unknown strategy '{requested}': choose one of {', '.join(STRATEGIES)}")
    return requested


def prepare_runtime(runtime: Runtime, packages: set[str], plan: Plan) -> None:
    """Embedded: allow the program's packages and consume its queues. Cluster: check reachability."""
    if not runtime.settings.embedded:
        runtime.check_reachable()
        return
    from dspex_celery.embedded import EmbeddedWorker, allow_program

    allow_program(runtime, packages, plan)
    resources = sorted({module.resource for module in plan.modules.values()})
    queues = worker_queues(runtime.settings.namespace, resources)
    if runtime.embedded_worker is None:
        runtime.embedded_worker = EmbeddedWorker(runtime.app, queues, runtime.settings.embedded_concurrency)
    else:
        runtime.embedded_worker.consume(queues)
