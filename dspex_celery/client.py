"""Submitting programs and waiting for results: ``submit_program`` and ``ExecutionHandle``."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
import uuid
from collections.abc import AsyncIterator, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from celery import Celery, states
from celery.backends.redis import RedisBackend

from dspex_celery import aio, defaults
from dspex_celery.app import unsubscribed_dispatch
from dspex_celery.bootstrap import default_runtime
from dspex_celery.canvas import hard_time_limit
from dspex_celery.errors import (
    ConfigError,
    ExecutionFailed,
    ExecutionTimeout,
    InputError,
    StateLost,
    StateStoreUnreachable,
    UnknownExecution,
    UsageError,
    reason_of,
)
from dspex_celery.execution import (
    TAKEOVER_CHECK_S,
    Execution,
    timeout_message,
)
from dspex_celery.graph import package_of
from dspex_celery.history.location import history_present
from dspex_celery.integrations.dspy_worker import TRACE_META
from dspex_celery.plan import ModulePlan, Plan, plan_text
from dspex_celery.presence import warn_if_unserved
from dspex_celery.program import Program
from dspex_celery.results import (
    ExecutionResult,
    ExecutionStatus,
    ModuleRecord,
    ModuleStatus,
    describe_failure,
    isoformat,
    utcnow,
)
from dspex_celery.routing import worker_queues
from dspex_celery.runtime import Runtime, runtime_of
from dspex_celery.spec import ProgramSpec, non_finite_input
from dspex_celery.strategies.registry import choose_strategy, get_strategy
from dspex_celery.tracing import execution_span, tracing_enabled

ProgramLike = Program | ProgramSpec | dict[str, Any] | str | Path

#: Seconds to wait for the result an execution publishes once it was ended (timeout, cancel).
ENDED_WAIT_S = 30.0
#: Seconds between a waiting client's checks that the execution's state still exists.
STATE_CHECK_S = TAKEOVER_CHECK_S
#: Seconds a waiting client keeps trying a state store that does not answer before it gives up.
UNREACHABLE_GIVE_UP_S = 30.0
#: Pause between two tries to reach a state store that does not answer.
RECONNECT_PAUSE_S = 0.5


class ExecutionHandle:
    """A submitted execution: ask its status, wait for its result."""

    def __init__(self, runtime: Runtime, execution_id: str, timeout: float | None = None) -> None:
        self.runtime = runtime
        self.execution_id = execution_id
        self.timeout = timeout
        self._deadline = time.monotonic() + timeout if timeout is not None else None
        #: The store held this execution's state once (so its absence means lost, not unknown).
        self.state_seen = False

    def __repr__(self) -> str:
        return f"ExecutionHandle({self.execution_id!r})"

    def status(self) -> ExecutionStatus:
        meta = self.runtime.store.meta(self.execution_id)
        if not meta:
            raise UnknownExecution(f"unknown or expired execution '{self.execution_id}'")
        self.state_seen = True
        return ExecutionStatus(meta.get("status", ExecutionStatus.RUNNING.value))

    def records(self) -> dict[str, ModuleRecord]:
        """Current module records (while it runs, too)."""
        return self.runtime.store.records(self.execution_id)

    def get(self, timeout: float | None = None, propagate: bool = True) -> ExecutionResult:
        """Wait for the result.

        With no ``timeout``, waits until the submission's timeout (counted from submission) is
        over and then ends the execution as failed (pending modules revoked). An explicit
        ``timeout`` only stops waiting: :class:`ExecutionTimeout` is raised and the execution goes on.
        ``propagate``: a failed or cancelled execution raises :class:`ExecutionFailed` (the result is
        its ``.result``); ``propagate=False`` returns it.

        While it waits, a result whose finisher died after claiming it is published here; state that
        vanished from the store raises :class:`StateLost` within seconds, and a store that does not
        answer for :data:`UNREACHABLE_GIVE_UP_S` raises :class:`StateStoreUnreachable`.
        """
        try:
            result = self._wait(timeout)
        except redis.RedisError as exc:
            raise self.unreachable(exc) from None
        if propagate and result.status in (ExecutionStatus.FAILED, ExecutionStatus.CANCELLED):
            raise ExecutionFailed(result, describe_failure(result))
        return result

    def _wait(self, timeout: float | None) -> ExecutionResult:
        result = ResultWaiter(self).wait(timeout if timeout is not None else self.remaining())
        if result is not None:
            return result
        if timeout is not None:
            raise ExecutionTimeout(f"execution {self.execution_id} did not finish within {timeout:g} s")
        self.check_state()  # never finish from what is left of lost state (all modules "cancelled")
        Execution(self.runtime, self.execution_id).finish(ExecutionStatus.FAILED, timeout_message(self.timeout))
        return self._wait(ENDED_WAIT_S)

    def __await__(self) -> Generator[Any, None, ExecutionResult]:
        """``await handle``: the result as :meth:`get` gives it, without blocking the event loop."""
        return self.get_async().__await__()

    async def get_async(self, timeout: float | None = None, propagate: bool = True) -> ExecutionResult:
        """:meth:`get`, awaited: the handles of one event loop share one pub/sub connection."""
        return await aio.get_async(self, timeout, propagate)

    def watch(self, poll_s: float = aio.WATCH_POLL_S) -> AsyncIterator[aio.RecordUpdate]:
        """``async for update in handle.watch()``: each module record as it changes
        (``update.module``, ``update.record``), until the execution has ended."""
        return aio.watch(self, poll_s)

    def check_state(self) -> None:
        """Raise when the store no longer holds the execution: :class:`StateLost` if it did before,
        else :class:`UnknownExecution`."""
        if self.runtime.store.exists(self.execution_id):
            self.state_seen = True
            return
        if self.state_seen:
            raise StateLost(self.execution_id)
        raise UnknownExecution(f"unknown or expired execution '{self.execution_id}'")

    def unreachable(self, exc: BaseException) -> StateStoreUnreachable:
        reason = reason_of(exc)
        return StateStoreUnreachable(
            self.execution_id,
            f"execution {self.execution_id}: the state store (result backend) does not answer ({reason}); "
            f"the execution goes on if it comes back: check it later with dspex-celery show {self.execution_id}",
        )

    def remaining(self) -> float | None:
        return None if self._deadline is None else max(0.001, self._deadline - time.monotonic())

    def cancel(self) -> ExecutionResult:
        """End the execution as ``cancelled``: pending modules are revoked and running ones
        terminated (prefork workers); an execution that already ended keeps its result."""
        self.status()  # unknown or expired: UnknownExecution
        cancel_execution(self.runtime, self.execution_id)
        return self.get(timeout=ENDED_WAIT_S, propagate=False)

    def current(self) -> ExecutionResult:
        """A snapshot of the execution as it is now (outputs so far, module records)."""
        execution = Execution(self.runtime, self.execution_id)
        if execution.plan is None:
            raise UnknownExecution(f"unknown or expired execution '{self.execution_id}'")
        return execution.result(self.status())


class ResultWaiter:
    """Waits for one execution's published result (Redis pub/sub, else polling) and, every
    :data:`STATE_CHECK_S`, checks that its state still exists and publishes an abandoned finish claim.

    A store that does not answer is tried again for :data:`UNREACHABLE_GIVE_UP_S` (an outage the
    execution can survive) before its error is raised.
    """

    def __init__(self, handle: ExecutionHandle) -> None:
        self.handle = handle
        self.runtime = handle.runtime
        self.backend = handle.runtime.app.backend
        self.key = self.backend.get_key_for_task(handle.execution_id)
        self.pubsub: Any = None
        self.failing_since: float | None = None

    def wait(self, seconds: float | None) -> ExecutionResult | None:
        """The result, or None when ``seconds`` (None: no limit) passed first."""
        give_up = None if seconds is None else time.monotonic() + seconds
        next_check = time.monotonic()
        try:
            while give_up is None or time.monotonic() < give_up:
                until = next_check if give_up is None else min(next_check, give_up)
                try:
                    data = self._next(max(until - time.monotonic(), 0.0))
                    if data is None and time.monotonic() >= next_check:
                        next_check = time.monotonic() + STATE_CHECK_S
                        data = self.check()
                    self.failing_since = None
                except redis.RedisError as exc:
                    self._retry_later(exc)
                    continue
                if data is not None:
                    return ExecutionResult.model_validate(data)
            return None
        finally:
            self.close()

    def check(self) -> Any:
        """The result if it was published meanwhile; else make sure the state exists and take over
        an abandoned finish claim (its result then arrives like any other)."""
        data = self.fetch()
        if data is None:
            self.handle.check_state()
            Execution(self.runtime, self.handle.execution_id).publish_abandoned()
        return data

    def _next(self, seconds: float) -> Any:
        """The published result if it arrives within ``seconds``, else None."""
        if not isinstance(self.backend, RedisBackend):
            data = self.fetch()
            if data is None:
                time.sleep(min(seconds, defaults.EMBEDDED_POLL_S * 2))
            return data
        if self.pubsub is None:
            self.pubsub = self.backend.client.pubsub(ignore_subscribe_messages=True)
            self.pubsub.subscribe(self.key)
            data = self.fetch()  # published before the subscription took effect
            if data is not None:
                return data
        message = self.pubsub.get_message(timeout=seconds)
        return self.decode(message["data"]) if message and message["type"] == "message" else None

    def fetch(self) -> Any:
        raw = self.backend.get(self.key)
        return None if raw is None else self.decode(raw)

    def decode(self, raw: Any) -> Any:
        meta = self.backend.decode_result(raw)
        return meta.get("result") if meta.get("status") == states.SUCCESS else None

    def _retry_later(self, exc: redis.RedisError) -> None:
        """After a store error: drop the subscription and pause, or raise once it lasted too long."""
        self.close()
        now = time.monotonic()
        self.failing_since = self.failing_since or now
        if now - self.failing_since >= UNREACHABLE_GIVE_UP_S:
            raise exc
        time.sleep(RECONNECT_PAUSE_S)

    def close(self) -> None:
        if self.pubsub is not None:
            pubsub, self.pubsub = self.pubsub, None
            with contextlib.suppress(Exception):  # closing a dead connection
                pubsub.close()


async def asubmit_program(program: ProgramLike, inputs: dict[str, Any] | None = None, **options: Any) -> ExecutionHandle:
    """:func:`submit_program` without blocking the event loop (same arguments); ``await`` the handle."""
    call = functools.partial(submit_program, program, inputs, **options)
    return await asyncio.get_running_loop().run_in_executor(None, call)


def cancel_execution(runtime: Runtime, execution_id: str) -> bool:
    """End ``execution_id`` as ``cancelled`` (as ``dspex-celery cancel``) without waiting for anything:
    pending modules are revoked, running ones terminated. False when it had already ended."""
    return Execution(runtime, execution_id).finish(ExecutionStatus.CANCELLED, "cancelled on request")


def profiled_plan(runtime: Runtime, program: Program, *, use_profile: bool = True,
                  learned_timeouts: bool | None = None) -> Plan:
    """The program's plan, with its history profile applied when ``use_profile`` and there is history
    to read (the optimizer, and SQLAlchemy with it, is imported only then)."""
    plan = program.plan()
    if not use_profile or not history_present(runtime.settings):
        return plan
    from dspex_celery.optimizer import apply_profile

    return apply_profile(runtime.settings, program, plan, learned_timeouts=learned_timeouts)


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
    dspy_trace: bool = False,
) -> ExecutionHandle:
    """Validate ``program``, store its plan and dispatch it; returns at once with a handle.

    ``use_profile``: plan with the optimizer's profile of this program version, if history has one.
    ``learned_timeouts``: also take its timeouts where the program sets none (None: the program's
    ``timeouts:`` key, else the ``learned_timeouts`` setting, decides; off by default).
    ``timeout``: seconds from now after which the execution ends as failed.
    ``resume_from``: an ended execution whose succeeded modules are reused (copied, ``reused: true``)
    when their definition and upstream are unchanged; ``inputs`` default to its inputs.
    ``dspy_trace``: the workers keep each dspy module's DSPy trace (``dspy_worker.read_trace``), for a
    client running under an active DSPy trace (an optimizer such as BootstrapFewShot).
    """
    runtime = runtime_of(app) if app is not None else default_runtime()
    program = Program.coerce(program)
    plan = profiled_plan(runtime, program, use_profile=use_profile, learned_timeouts=learned_timeouts)
    source = resume_source(runtime, resume_from) if resume_from else None
    if source is not None:
        inputs = source.same_inputs(inputs)
    values = check_inputs(plan, inputs or {})
    chosen = choose_strategy(plan, strategy)
    handle = launch(runtime, plan, program.packages(), values, chosen, timeout, source, dspy_trace=dspy_trace)
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
    dspy_trace: bool = False,
) -> ExecutionHandle:
    """Store a new execution (reused outputs first) and start its strategy.

    ``execution_id``: an id chosen (and journaled) by the caller beforehand; a fresh one otherwise.
    ``dspy_trace``: the workers keep the DSPy traces of its dspy modules (see :func:`submit_program`).
    """
    check_visibility_timeout(runtime, plan)
    prepare_runtime(runtime, packages, plan)
    execution_id = execution_id or new_execution_id()
    meta = _meta(plan, strategy, inputs, timeout, source)
    if dspy_trace:
        meta[TRACE_META] = True
    with execution_span(plan.program, execution_id, strategy) as trace_context:
        if trace_context:
            meta["trace"] = trace_context  # the workers' module spans are its children
        runtime.store.create(execution_id, plan, meta)
        if source is not None:
            source.copy_reusable(runtime, plan, execution_id)
        start_execution(runtime, execution_id, strategy, plan)
    handle = ExecutionHandle(runtime, execution_id, timeout)
    handle.state_seen = True
    return handle


def start_execution(runtime: Runtime, execution_id: str, strategy: str, plan: Plan | None = None) -> None:
    """Dispatch a stored execution's first modules, then mark it ``started`` in its meta (``plan``:
    the one it was stored with, if at hand: the strategy then does not read it back).

    The mark lets a batch re-run tell an execution its killed client stored but never started
    (start it) from one that runs (wait for it).
    """
    with unsubscribed_dispatch():  # nothing here waits on the module tasks' own results
        get_strategy(strategy).start(Execution(runtime, execution_id, plan))
    runtime.store.update_meta(execution_id, started=True)


def launch_together(
    runtime: Runtime, plan: Plan, inputs: dict[str, dict[str, Any]], strategy: str, timeout: float | None
) -> bool:
    """Store and start new executions of ``plan`` (execution id -> inputs) in one transaction, one
    round trip for them all (batch runs; the caller checked plan and runtime, as :func:`launch` does).

    False, with nothing stored, when ``strategy`` cannot start them so (then :func:`launch` each one):
    it must write its first task messages from the store (``dag`` on a Redis broker in the store's
    database); tracing on, each execution is submitted in its own span by :func:`launch`.
    """
    chosen = get_strategy(strategy)
    executions = [Execution(runtime, execution_id, plan) for execution_id in inputs]
    if not executions or tracing_enabled() or not chosen.starts_in_pipeline(executions[0]):
        return False
    plan_json, _ = plan_text(plan)
    pipe = runtime.store.client.pipeline()
    for execution in executions:
        meta = {**_meta(plan, strategy, inputs[execution.id], timeout, None), "started": True}
        runtime.store.queue_create(pipe, execution.id, plan_json, meta)
        chosen.queue_start(execution, pipe)
    pipe.execute()
    return True


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
        execution = Execution(runtime, execution_id, plan)
        for name in names:
            if name in outputs:
                runtime.store.put_output(execution_id, name, outputs[name])
                execution.write_record(name, self.records[name].model_copy(update={"reused": True}))


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
    try:
        json.dumps(inputs, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise InputError(non_finite_input(inputs) or f"inputs must be JSON values ({exc})") from None
    return inputs


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
