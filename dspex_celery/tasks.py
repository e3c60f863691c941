"""The engine's Celery tasks: run one module (on a resource-class worker) and advance a stage."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import mmap
import os
import reprlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import redis
from billiard.exceptions import SoftTimeLimitExceeded
from celery import Celery, Task
from celery.signals import worker_process_init, worker_shutting_down
from celery.worker import state as worker_state

from dspex_celery.backups import backup_record, is_backup, leave_race, log_loser, steps_aside
from dspex_celery.call_threads import CallThreads
from dspex_celery.defaults import MIN_RETRY_COUNTDOWN_S, RESULT_SUMMARY_CHARS
from dspex_celery.canvas import ADVANCE, COMPENSATE, PLAN_HEADER, RUN_MODULE, module_signature
from dspex_celery.compensation import CompensationRun
from dspex_celery.continuation import (
    Begun,
    CarrierMessage,
    FirstAttempt,
    Lease,
    Offer,
    TaskEvents,
    Taken,
    UnackedKeys,
    chain_key,
    restore_chain,
    task_events_on,
)
from dspex_celery.errors import ModuleError, ModuleTimeout, TransientError, WorkerLost, imported_exceptions
from dspex_celery.execution import Execution, lost_reason
from dspex_celery.hooks import ModuleContext
from dspex_celery.integrations.dspy_worker import TRACE_META, is_lm_transient, metered_call, traced, usage_fields
from dspex_celery.plan import ModulePlan, Plan
from dspex_celery.rate_limits import is_rate_limit, retry_after_s
from dspex_celery.results import (
    ModuleRecord,
    ModuleStatus,
    isoformat,
    parse_time,
    utcnow,
)
from dspex_celery.runner import (
    backoff_delay,
    check_allowed,
    load_callable,
    normalize_output,
    resolve_inputs,
)
from dspex_celery.runtime import Runtime, runtime_of
from dspex_celery.state import ModuleStart
from dspex_celery.usage import Usage
from dspex_celery.strategies.base import Strategy
from dspex_celery.strategies.levels import StagedStrategy
from dspex_celery.strategies.registry import FALLBACK_STRATEGY, get_strategy, strategy_of

log = logging.getLogger(__name__)

BUILTIN_TRANSIENT: tuple[type[BaseException], ...] = (TransientError, ConnectionError, TimeoutError)

#: A module whose worker process died this many times (kill -9, out of memory) fails with
#: ``WorkerLost`` instead of being re-delivered again: a module that kills its process every time
#: must not take down worker processes forever.
MAX_LOST_ATTEMPTS = 3

#: Errors of the state store or broker on which ``advance`` is retried.
INFRA_ERRORS: tuple[type[BaseException], ...] = (redis.ConnectionError, redis.TimeoutError, OSError)
#: How often a module task whose state store does not answer (a Sentinel failover, a restart) is sent
#: again, at most :data:`STORE_RETRY_MAX_S` apart; then the task fails and its module with it.
STORE_RETRIES = 12
STORE_RETRY_MAX_S = 4

_pool_child = threading.Event()
_call_threads = CallThreads("dspex-module-call")


@worker_process_init.connect(weak=False)
def _mark_pool_child(**_: Any) -> None:
    """Prefork pool children enforce ``timeout_s`` with Celery's time limits; others cannot."""
    _pool_child.set()


class ModuleTask(Task):
    """``dspex.run_module``: when the task itself fails (hard time limit, crash outside the module
    call), the module still gets a final ``failed`` record and its strategy hears of it.

    On a Sentinel-managed store the task is acknowledged only once a replica has its writes (a
    failover then cannot lose a finished module's output); when the master goes away first, the task
    is sent again."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        result = super().__call__(*args, **kwargs)
        sync = runtime_of(self.app).store.replica_sync
        if sync is not None and not self.request.called_directly:
            try:
                sync.wait()
            except INFRA_ERRORS as exc:
                raise self.retry(exc=exc, countdown=1, max_retries=STORE_RETRIES) from None
        return result

    def on_failure(self, exc: BaseException, task_id: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                   einfo: Any) -> None:
        if len(args) < 2:  # a message not sent by the engine (the call itself raised TypeError)
            return
        settle_failed_run(runtime_of(self.app), args[0], args[1], exc)


def settle_failed_run(runtime: Runtime, execution_id: str, name: str, exc: BaseException) -> None:
    """A run of ``name`` that ended in an error outside the module call: a final ``failed`` record
    (unless it has one), and its strategy hears of it."""
    try:
        execution = Execution(runtime, execution_id)
        if execution.settle_lost(name, lost_reason(exc)):
            strategy = execution.store.meta_field(execution_id, "strategy", FALLBACK_STRATEGY)
            get_strategy(strategy).module_finished(execution, name, ModuleStatus.FAILED)
    except Exception:  # the store may be what failed; the stage's advance settles it then
        log.exception("could not record the failure of %s in %s", name, execution_id)


def register_tasks(app: Celery) -> None:
    """Register the engine's tasks on ``app``."""

    @app.task(name=RUN_MODULE, base=ModuleTask, bind=True, shared=False, max_retries=None, acks_late=True,
              reject_on_worker_lost=True, autoretry_for=INFRA_ERRORS, retry_kwargs={"max_retries": STORE_RETRIES},
              retry_backoff=1, retry_backoff_max=STORE_RETRY_MAX_S)
    def run_module(self: Task, execution_id: str, module: str, program: str | None = None) -> dict[str, Any]:
        return run_chain(self, runtime_of(self.app), execution_id, module)

    @app.task(name=ADVANCE, bind=True, shared=False, acks_late=True, reject_on_worker_lost=True,
              autoretry_for=INFRA_ERRORS, retry_backoff=True, max_retries=5)
    def advance(self: Task, execution_id: str, strategy: str, stage: int) -> None:
        advance_stage(runtime_of(self.app), execution_id, strategy, stage)

    @app.task(name=COMPENSATE, bind=True, shared=False, max_retries=None, acks_late=True,
              reject_on_worker_lost=True, autoretry_for=INFRA_ERRORS, retry_kwargs={"max_retries": STORE_RETRIES},
              retry_backoff=1, retry_backoff_max=STORE_RETRY_MAX_S)
    def compensate(self: Task, execution_id: str, order: list[str]) -> dict[str, Any]:
        return CompensationRun(self, runtime_of(self.app), execution_id, order).run()


def advance_stage(runtime: Runtime, execution_id: str, strategy: str, stage: int) -> None:
    """After a stage's chord (or its errback): its strategy settles that stage and goes on."""
    staged = get_strategy(strategy)
    if not isinstance(staged, StagedStrategy):  # not sent by the engine
        log.warning("execution %s: strategy %r has no stages; dropping an advance message", execution_id, strategy)
        return
    staged.stage_done(Execution(runtime, execution_id), stage)


def run_chain(task: Task, runtime: Runtime, execution_id: str, module: str) -> dict[str, Any]:
    """Run ``module``, then each module its strategy leased to this worker (a ready child, or the next
    queued module of this or another execution: worker-local continuation,
    :mod:`dspex_celery.continuation`), at most ``dag_continuation`` in a row; returns the
    first run's result (the task's). A continued run that fails outside its call is settled as a task
    failure would be; on a store or broker error the task is retried and the re-run puts the lease
    back on its queue; an interrupted one keeps its lease (it is re-delivered)."""
    left = runtime.settings.dag_continuation
    run = ModuleRun(task, runtime, execution_id, module, offer=continuation_offer(task, runtime, left),
                    plan_digest=getattr(task.request, PLAN_HEADER, None))
    carrier = CarrierMessage.of(task, run.offer)
    result = run.run()
    if run.repeated and run.offer is not None:  # this task came back: its chain's lease goes back too
        restore_chain(runtime.store, run.offer.keys, run.offer.chain)
    while run.offer is not None and run.offer.claimed is not None:
        lease, left, begun = Lease.of(run.offer.claimed, run.offer), left - 1, run.offer.begun
        carrier.keep_visible(runtime.store.client)
        offer = continuation_offer(task, runtime, left, held=True)
        run = ModuleRun(task, runtime, lease.execution_id, lease.module, offer=offer, lease=lease, begun=begun,
                        plan_digest=run.offer.plan)
        events, started = _task_events(task, run), time.monotonic()
        outcome: dict[str, Any] = {"status": ModuleStatus.FAILED.value}
        try:
            outcome = run.run()
        except INFRA_ERRORS:
            raise
        except Exception as exc:  # a bug around the call: as on_failure does for a task
            settle_failed_run(runtime, lease.execution_id, lease.module, exc)
            run.offer = None
        if not run.lease_released:
            lease.release(runtime.store.client)
        if events is not None:
            events.ended(outcome, time.monotonic() - started)
    return result


def _task_events(task: Task, run: ModuleRun) -> TaskEvents | None:
    """While this worker sends task events, the events of a continued module's own task (sent as it
    starts), so that Flower lists it; else None."""
    plan = run.execution.plan
    if plan is None or run.name not in plan.modules or not task_events_on():
        return None
    events = TaskEvents.of(task.app, str(task.request.hostname), run.execution_id, run.name)
    events.started(f"dspex.module:{plan.program}.{run.name}", repr((run.execution_id, run.name)),
                   repr({"program": plan.program}))
    return events


#: One byte shared with the prefork pool processes (mapped before they fork): set when the worker's main
#: process begins its shutdown, which a pool process is not told of (its worker_state is its own).
_STOPPING = mmap.mmap(-1, 1)


@worker_shutting_down.connect(weak=False)
def _mark_stopping(**_: Any) -> None:
    _STOPPING[0] = 1


def worker_stopping() -> bool:
    """True once the worker began a warm or cold shutdown: a slot ends the module it runs and, as Celery's
    own warm shutdown promises, takes nothing more (in a prefork pool process too)."""
    return _STOPPING[0] == 1 or any(flag is not None and flag is not False
                                    for flag in (worker_state.should_stop, worker_state.should_terminate))


def continuation_offer(task: Task, runtime: Runtime, left: int, held: bool = False) -> Offer | None:
    """This worker's offer to continue a child (None when there is no Redis queue to lease from); it
    offers no queue when it may not continue one (chain bound reached, or this message's Celery time
    limit would cover the child too), and then only when ``held``: the module it goes with runs under
    a lease, which the strategy's count releases."""
    if runtime.queues is None or task.request.called_directly:
        return None
    limited = _pool_child.is_set()
    may_continue = left > 0 and not (limited and any(task.request.timelimit or ()))
    if not (may_continue or held):
        return None
    consumed = (task.app.amqp.queues.consume_from or {}) if may_continue else {}
    return Offer(frozenset(consumed), UnackedKeys.of(task.app), chain_key(runtime.settings.namespace, task.request.id),
                 timeouts=not limited, held=held,
                 ahead=functools.partial(first_attempt, task, runtime),
                 fresh=functools.partial(fresh_record_json, str(task.request.hostname)))


def first_attempt(task: Task, runtime: Runtime, plan: Plan, name: str) -> FirstAttempt:
    """How module ``name`` starts its first attempt on this worker: its running record (stored when it
    has none yet) and the hooks' begin steps."""
    return FirstAttempt(running_record(task, plan, name, ModuleRecord()),
                        runtime.hooks.begin_steps(runtime, plan, plan.modules[name]))


def running_record(task: Task, plan: Plan, name: str, previous: ModuleRecord) -> ModuleRecord:
    """The record of the attempt after ``previous``, starting now on this worker."""
    return ModuleRecord(
        status=ModuleStatus.RUNNING,
        attempts=previous.attempts + 1,
        started_at=isoformat(utcnow()),
        worker=task.request.hostname,
        resource=plan.modules[name].resource,
        lost_attempts=previous.lost_attempts,
        **Usage.of(previous).record_fields(),  # LM usage of all attempts
    )


def fresh_record_json(worker: str, resource: str, started_at: str) -> str:
    """The JSON running record of a first attempt on ``worker``, started at ``started_at`` (ISO), of a
    module of ``resource``: :func:`running_record`'s, from a template kept per worker and class (a
    count offers one per queue the worker reads, each time)."""
    prefix, suffix = _fresh_template(worker, resource)
    return prefix + json.dumps(started_at) + suffix


_STARTED_MARK = "dspex-started-at-mark"


@functools.lru_cache(maxsize=256)
def _fresh_template(worker: str, resource: str) -> tuple[str, str]:
    record = ModuleRecord(status=ModuleStatus.RUNNING, attempts=1, started_at=_STARTED_MARK, worker=worker,
                          resource=resource, **Usage.of(ModuleRecord()).record_fields())
    prefix, _, suffix = record.model_dump_json().partition(json.dumps(_STARTED_MARK))
    return prefix, suffix


class ModuleRun:
    """One attempt of one module on a worker; ``lease``: a child continued here (not its own message),
    ``begun`` when the count that leased it began it too; ``offer``: whether this worker offers to
    continue one of its ready children."""

    def __init__(self, task: Task, runtime: Runtime, execution_id: str, name: str, *, offer: Offer | None = None,
                 lease: Lease | None = None, begun: Begun | Taken | None = None, plan_digest: str | None = None) -> None:
        self.task = task
        self.offer = offer
        self.lease = lease
        self.begun = begun if begun is not None and lease is not None and begun.leased == lease.task_id else None
        self.lease_released = False  # by the count that stored this (continued) module's success
        self.repeated = False  # its record was final already: its task came back
        self.runtime = runtime
        self.store = runtime.store
        self.execution = Execution(runtime, execution_id, plan_digest=plan_digest)
        self.execution_id = execution_id
        self.name = name
        self.strategy: Strategy = get_strategy(FALLBACK_STRATEGY)  # the execution's, once its meta is read

    def run(self) -> dict[str, Any]:
        plan = self.execution.plan
        if plan is None:
            log.warning("execution %s is unknown or expired; dropping %s", self.execution_id, self.name)
            return {"module": self.name, "status": "expired"}
        module = plan.modules.get(self.name)
        if module is None:  # a stray message: no record, the execution goes on as it was
            log.warning("execution %s has no module %r; dropping a run_module message for it",
                        self.execution_id, self.name)
            return {"module": self.name, "status": "unknown"}
        if isinstance(self.begun, Taken):  # begun by the count that took it
            self.begun = self.begun.begun(module.parents)
        attempt = self.begun.attempt if self.begun is not None else first_attempt(self.task, self.runtime, plan, self.name)
        if self.offer is not None:
            self.offer.steps = attempt.steps
        first, steps = attempt.record, attempt.steps
        begin = self.begun.start if self.begun is not None else self.store.begin(
            self.execution_id, self.name, module.parents, first, [step for _, step in steps])
        if not begin.meta:  # its state expired meanwhile (its plan came from this process's cache)
            log.warning("execution %s is unknown or expired; dropping %s", self.execution_id, self.name)
            return {"module": self.name, "status": "expired"}
        self.strategy = strategy_of(begin.meta)
        previous = begin.record
        if begin.finished:  # re-delivered after its worker died while finishing the execution?
            self.execution.finish_abandoned(begin.meta)
        if previous.status.final:
            # Re-delivered after its worker died: the strategy may not have heard (idempotent).
            self.repeated = True
            self.strategy.module_finished(self.execution, self.name, previous.status)
            return {"module": self.name, "status": previous.status.value}
        if begin.finished or self.execution.deadline_passed(begin.meta):
            return {"module": self.name, "status": ModuleStatus.CANCELLED.value}
        backup = is_backup(self.task)
        if backup and previous.status is not ModuleStatus.RUNNING:  # the attempt it backs up is over
            leave_race(self.store, self.execution_id, self.name)
            return {"module": self.name, "status": "backup not needed"}
        if previous.status is ModuleStatus.RUNNING and not backup:
            previous = self._lost(previous)
            if previous.status.final:
                return {"module": self.name, "status": previous.status.value}
        if backup:  # races the running attempt; its record stays the module's until one finishes
            record = backup_record(previous, self.task.request.hostname)
        else:
            record = first if begin.running_written else running_record(self.task, plan, self.name, previous)
        ctx = self._start(plan, record, stored=begin.running_written or backup)
        ctx.extras["task_id"] = self.task.request.id  # a backup that wins revokes it
        ctx.begun = {hook: reply for (hook, _), reply in zip(steps, begin.step_replies, strict=False)}
        ctx.extras["meta"] = begin.meta  # the execution's meta as begin read it (tracing, metrics)
        try:
            self.runtime.hooks.before_module(ctx)
            output = self._call(ctx, begin)
        except Exception as exc:  # a module may raise anything; each becomes a record
            return self._failed(ctx, _as_timeout(exc, ctx.module))
        except BaseException as exc:  # terminated (cancel, shutdown): release what hooks hold, no record
            self.runtime.hooks.after_failure(ctx, exc, False)
            raise
        finally:
            self.runtime.hooks.after_module(ctx)
        return self._succeeded(ctx, output)

    def _lost(self, previous: ModuleRecord) -> ModuleRecord:
        """The last attempt never finished: its worker process died. Count it; give up after a few."""
        lost = previous.model_copy(update={"lost_attempts": previous.lost_attempts + 1})
        if lost.lost_attempts < MAX_LOST_ATTEMPTS:
            log.warning("%s of %s: re-running after its worker was lost (attempt %d)",
                        self.name, self.execution_id, previous.attempts)
            return lost
        error = WorkerLost(f"module '{self.name}': its worker process died {lost.lost_attempts} times "
                           "(killed or out of memory); not re-running it again")
        failed = lost.model_copy(update={"status": ModuleStatus.FAILED, "error": f"WorkerLost: {error}",
                                         "finished_at": isoformat(utcnow())})
        self._fail(failed)
        return failed

    def _start(self, plan: Plan, record: ModuleRecord, *, stored: bool) -> ModuleContext:
        """The attempt's context; its running record is written unless ``stored`` already."""
        if stored:
            self.runtime.hooks.on_record(self.execution_id, self.name, record)
        else:
            self.execution.write_record(self.name, record)
        return ModuleContext(
            runtime=self.runtime,
            execution_id=self.execution_id,
            plan=plan,
            module=plan.modules[self.name],
            attempt=record.attempts,
            worker=record.worker or "",
            started_at=parse_time(record.started_at) if record.started_at else utcnow(),
            record=record,
        )

    def _call(self, ctx: ModuleContext, begin: ModuleStart) -> dict[str, Any]:
        module = ctx.module
        check_allowed(module, self.runtime.allowed_packages, ctx.plan.program)
        loaded = load_callable(module)
        function, ctx.extras["lm_meter"] = metered_call(loaded, self.runtime)
        if begin.meta.get(TRACE_META):  # the client runs under a DSPy trace (BootstrapFewShot): keep this one's
            function = traced(self.store, self.execution_id, module.name, loaded, function)
        kwargs = resolve_inputs(module, begin.meta.get("inputs", {}), begin.upstream)
        ctx.extras["called"] = True  # hooks (the circuit breaker) count only failures of real calls
        with self._stopped_when_execution_ends():
            return normalize_output(module, call_module(module, function, kwargs))

    @contextmanager
    def _stopped_when_execution_ends(self) -> Iterator[None]:
        """A continued module in a prefork pool child runs inside another module's task, which a cancel or
        timeout does not revoke (it names this module's own task id): while its call runs, this pool process
        ends itself (as Celery's terminate would) once the execution has ended."""
        if self.lease is None or not _pool_child.is_set():
            yield
            return
        with _continued_watch.watching(self.store, self.execution_id, self.name):
            yield

    def _finished_record(self, ctx: ModuleContext, **changes: Any) -> ModuleRecord:
        finished = utcnow()
        duration = (finished - ctx.started_at).total_seconds()
        usage = usage_fields(ctx.record, ctx.extras.get("lm_meter"))
        return ctx.record.model_copy(
            update={"finished_at": isoformat(finished), "duration_s": round(duration, 6), **usage, **changes}
        )

    def _succeeded(self, ctx: ModuleContext, output: dict[str, Any]) -> dict[str, Any]:
        record = self._finished_record(ctx, status=ModuleStatus.SUCCEEDED)
        # One atomic store call (unless the execution ended meanwhile); children go out first:
        # they are on the critical path, the hooks are not.
        if self.offer is not None and worker_stopping():  # still released by the count; continues nothing
            self.offer = dataclasses.replace(self.offer, queues=frozenset())
        if not self.strategy.module_succeeded(self.execution, self.name, output, record, offer=self.offer):
            return self._too_late(ctx, lambda: self.runtime.hooks.after_success(ctx, output))
        self.lease_released = self.offer is not None and self.offer.held
        ctx.record = record
        self.runtime.hooks.on_record(self.execution_id, self.name, record)
        self.runtime.hooks.after_success(ctx, output)
        return {"module": self.name, "status": record.status.value, "output": output_summary(output)}

    def _failed(self, ctx: ModuleContext, error: Exception) -> dict[str, Any]:
        if self.store.is_finished(self.execution_id):
            return self._too_late(ctx, lambda: self.runtime.hooks.after_failure(ctx, error, False))
        policy = ctx.module.retry_policy
        message = f"{type(error).__name__}: {error}"
        backup = bool((ctx.record.model_extra or {}).get("backup"))  # a backup attempt never retries
        will_retry = not backup and is_transient(error, ctx.module) and ctx.attempt < policy.max_attempts
        # A stage's chord waits for the primary's own task: under levels the primary never steps aside.
        may_step_aside = backup or not isinstance(self.strategy, StagedStrategy)
        if not will_retry and may_step_aside and steps_aside(self.store, self.execution_id, self.name):
            return self._step_aside(ctx, error, message)
        status = ModuleStatus.RETRYING if will_retry else ModuleStatus.FAILED
        record = self._finished_record(ctx, status=status, error=message)
        self.execution.write_record(self.name, record, attempt=True)
        ctx.record = record
        self.runtime.hooks.after_failure(ctx, error, will_retry)
        if will_retry and self.lease is not None:  # continued here: the retry is a message of its own
            self._send_retry(ctx, error)
            return {"module": self.name, "status": record.status.value, "error": short_text(message)}
        if will_retry:
            countdown = max(self._backoff(ctx, error), MIN_RETRY_COUNTDOWN_S)
            raise self.task.retry(countdown=countdown, exc=error, max_retries=None)
        self.execution.module_failed(self.name)
        self.strategy.module_finished(self.execution, self.name, ModuleStatus.FAILED)
        return {"module": self.name, "status": record.status.value, "error": short_text(message)}

    def _step_aside(self, ctx: ModuleContext, error: Exception, message: str) -> dict[str, Any]:
        """One of a backup race failed for good while the other runs on: its attempt is logged as the
        race's loser (the winner logs no other), the other decides the module."""
        log_loser(self.store, self.execution_id, self.name,
                  self._finished_record(ctx, status=ModuleStatus.FAILED, error=message))
        self.runtime.hooks.after_failure(ctx, error, False)
        return {"module": self.name, "status": ModuleStatus.FAILED.value, "error": message}

    def _send_retry(self, ctx: ModuleContext, error: Exception) -> None:
        """The next attempt of a continued module, sent as ``task.retry`` would send it."""
        signature = module_signature(self.runtime.app, ctx.plan, self.execution_id, self.name,
                                     self.runtime.settings.namespace)
        signature.apply_async(countdown=self._backoff(ctx, error), ignore_result=True)

    def _too_late(self, ctx: ModuleContext, after: Callable[[], None]) -> dict[str, Any]:
        """The execution ended (cancel, timeout, strict failure) during the call: its published
        records stay as they are; the hooks still run so that they release what they hold."""
        after()
        return {"module": self.name, "status": ModuleStatus.CANCELLED.value}

    def _fail(self, record: ModuleRecord) -> None:
        """Write this module's final ``failed`` record; the execution and its strategy hear of it."""
        self.execution.fail_module(self.name, record)
        self.strategy.module_finished(self.execution, self.name, ModuleStatus.FAILED)

    def _backoff(self, ctx: ModuleContext, error: BaseException) -> float:
        """The retry's countdown: the policy's backoff, and at least a rate limit's Retry-After (up to
        half the visibility timeout, as any countdown)."""
        visibility = self.runtime.settings.visibility_timeout_s
        delay = backoff_delay(ctx.module.retry_policy, ctx.attempt, visibility)
        return max(delay, min(retry_after_s(error) or 0.0, visibility / 2))


#: Seconds between two checks, by a continued module's watcher, of whether its execution ended.
CONTINUED_WATCH_S = 0.5


class ContinuedWatch:
    """One thread per pool process (a prefork child runs one call at a time) that, while a continued
    module's call runs, terminates the process once that module's execution has ended (SIGTERM, what a
    cancel sends to the process of a module's own task); a store that does not answer is asked again."""

    def __init__(self) -> None:
        self._current: tuple[Any, str, str] | None = None  # store, execution id, module
        self._pid = 0
        self._lock = threading.Lock()

    @contextmanager
    def watching(self, store: Any, execution_id: str, name: str) -> Iterator[None]:
        with self._lock:
            if self._pid != os.getpid():  # none yet in this (forked) process
                self._pid = os.getpid()
                threading.Thread(target=self._loop, name="dspex-continued-watch", daemon=True).start()
            self._current = (store, execution_id, name)
        try:
            yield
        finally:
            self._current = None

    def _loop(self) -> None:
        while True:
            time.sleep(CONTINUED_WATCH_S)
            current = self._current
            if current is None:
                continue
            store, execution_id, name = current
            try:
                finished = store.is_finished(execution_id)
            except INFRA_ERRORS:
                continue
            if finished and self._current is current:
                log.warning("%s of %s: its execution ended while it ran (continued in another module's task): "
                            "terminating this pool process", name, execution_id)
                os.kill(os.getpid(), signal.SIGTERM)
                return


_continued_watch = ContinuedWatch()


def _summary_repr() -> reprlib.Repr:
    short = reprlib.Repr()  # keyword arguments need Python 3.12
    short.maxlevel, short.maxdict, short.maxlist, short.maxstring, short.maxother = 2, 4, 4, 40, 40
    return short


_SUMMARY = _summary_repr()
#: Keys of a module's output shown in its task result; the rest are counted.
SUMMARY_KEYS = 6


def output_summary(output: dict[str, Any]) -> dict[str, Any]:
    """A size-bounded copy of a module's output for its task result (what Flower shows): the first
    keys, numbers as they are, strings cut short, containers as a short repr."""
    shown = dict(list(output.items())[:SUMMARY_KEYS])
    summary = {key[:40]: _short(value) for key, value in shown.items()}
    if len(output) > SUMMARY_KEYS:
        summary["..."] = f"{len(output) - SUMMARY_KEYS} more keys"
    return summary


def _short(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float):
        return value
    text = value if isinstance(value, str) else _SUMMARY.repr(value)
    return short_text(text, RESULT_SUMMARY_CHARS // SUMMARY_KEYS)


def short_text(text: str, limit: int = RESULT_SUMMARY_CHARS) -> str:
    """``text`` cut to ``limit`` characters (ending with ``...`` when cut)."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def call_module(module: ModulePlan, function: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    """Call a module. Outside a prefork pool child (threads/solo pools, embedded), where Celery's
    time limits do nothing, ``timeout_s`` is enforced by waiting for the call on another thread."""
    if module.timeout_s is None or _pool_child.is_set():
        return _guarded(module, function, kwargs)
    future = _call_threads.submit(functools.partial(_guarded, module, function, kwargs))
    try:
        return future.result(timeout=module.timeout_s)
    except FutureTimeout:
        if not future.done():
            raise ModuleTimeout(
                f"{module.overran()}; this worker pool cannot stop a call, so it was abandoned "
                "(use the prefork pool to have it killed)"
            ) from None
        return future.result()  # it returned just now, or raised a TimeoutError of its own


def _guarded(module: ModulePlan, function: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    """A module calling ``sys.exit()`` fails its run; it neither kills nor loops the worker."""
    try:
        return function(**kwargs)
    except (SystemExit, KeyboardInterrupt) as exc:
        if _shutting_down():
            raise
        raise ModuleError(f"module '{module.name}' raised {type(exc).__name__}({exc}); "
                          "return or raise an exception instead of exiting") from None


def _shutting_down() -> bool:
    """True when this pool process got its terminate signal (the SystemExit is the worker's)."""
    try:
        from billiard.common import terminate_handler_fired
    except ImportError:  # older billiard
        return False
    return bool(terminate_handler_fired())


def _as_timeout(error: Exception, module: ModulePlan) -> Exception:
    if isinstance(error, SoftTimeLimitExceeded):
        return ModuleTimeout(module.overran())
    return error


def is_transient(error: BaseException, module: ModulePlan) -> bool:
    """Transient errors are retried: built-in ones and the classes named in ``retry.on``;
    ``ModuleTimeout`` only while ``retry.timeouts`` is true."""
    if isinstance(error, ModuleTimeout) and not module.retry_policy.timeouts:
        return False
    if isinstance(error, BUILTIN_TRANSIENT + imported_exceptions(module.retry_policy.on)):
        return True
    # DSPy integration: LM rate limits, overload, connection errors; and any HTTP 429
    return is_lm_transient(error) or is_rate_limit(error)

