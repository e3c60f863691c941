"""Batch runs: one execution per input line across the cluster, bounded in flight, resumable.

Each input is a mapping: keys that are program inputs are the execution's inputs, the other keys
are the line's *labels* (what a metric compares the outputs with, like ``dspy.Example`` labels).
A batch yields one :class:`BatchLine` per input; :meth:`BatchRun.get` returns them in input order.
Lines of an earlier run (``previous=``) are reused when *this program version* (its fingerprint,
see :func:`program_fingerprint`) succeeded on the same input line, and re-attached (not submitted
again) when their execution was still running; every other line runs, and the run counts why.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import redis
from celery import states

from dspex_celery.bootstrap import default_runtime
from dspex_celery.client import (
    ProgramLike,
    cancel_execution,
    check_visibility_timeout,
    launch,
    launch_together,
    new_execution_id,
    prepare_runtime,
    profiled_plan,
    start_execution,
)
from dspex_celery.errors import UsageError
from dspex_celery.execution import TAKEOVER_CHECK_S, Execution
from dspex_celery.graph import resolve_uses
from dspex_celery.integrations.dspy_values import make_example, make_prediction
from dspex_celery.plan import Plan
from dspex_celery.presence import warn_if_unserved
from dspex_celery.result_stream import ResultStream
from dspex_celery.program import Program
from dspex_celery.results import ExecutionResult, ExecutionStatus, describe_failure
from dspex_celery.runtime import Runtime, runtime_of
from dspex_celery.spec import non_finite_input
from dspex_celery.strategies.registry import choose_strategy
from dspex_celery.usage import Usage, total_usage

#: Executions submitted and not yet finished, at most (the cluster's queue depth for this batch).
DEFAULT_MAX_IN_FLIGHT = 16
#: Seconds the loop waits for a published result before it looks at its submissions again.
POLL_S = 0.02
#: Threads that submit lines: one submission is a few Redis round trips, mostly spent waiting.
SUBMIT_THREADS = 4

SUCCEEDED, FAILED, INVALID, CANCELLED, SUBMITTED = "succeeded", "failed", "invalid", "cancelled", "submitted"
Metric = Callable[..., Any]

#: Why a line ran instead of being reused (``BatchResult.ran_because`` keys), as the summary says it.
RAN_BECAUSE = {
    "new": "not in the output yet",
    "failed": "failed before",
    "cancelled": "cancelled before",
    "input_changed": "whose input line changed",
    "other_version": "produced by another program version",
    "fresh": "rerun with --fresh",
}


@dataclass(frozen=True)
class BatchItem:
    """One input line: the program inputs, the labels, a content key, or why it cannot run."""

    index: int
    inputs: dict[str, Any]
    labels: dict[str, Any]
    key: str
    error: str | None = None


@dataclass
class BatchLine:
    """The outcome of one input line (one line of the output file)."""

    index: int
    key: str
    status: str
    outputs: dict[str, Any] | None = None
    error: str | None = None
    execution_id: str | None = None
    score: float | None = None
    metric_error: str | None = None
    #: The program version that produced the line (:func:`program_fingerprint`).
    fingerprint: str = ""
    reused: bool = field(default=False, compare=False)
    #: LM usage of the line's execution in this run (None: reused, or not run to the end).
    usage: Usage | None = field(default=None, compare=False)

    @property
    def succeeded(self) -> bool:
        return self.status == SUCCEEDED

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "index": self.index,
            "status": self.status,
            "outputs": self.outputs,
            "error": self.error,
            "execution_id": self.execution_id,
            "key": self.key,
            "fingerprint": self.fingerprint,
        }
        if self.score is not None:
            data["score"] = self.score
        if self.metric_error is not None:
            data["metric_error"] = self.metric_error
        if self.usage is not None and not self.usage.empty:
            data["usage"] = self.usage.to_json_dict()
        return data

    @classmethod
    def from_json(cls, data: Any) -> BatchLine | None:
        """A line read back from an output or journal file; None when it is not one."""
        if not isinstance(data, dict) or not isinstance(data.get("index"), int) or "status" not in data:
            return None
        return cls(
            index=data["index"], key=str(data.get("key", "")), status=str(data["status"]),
            outputs=data.get("outputs"), error=data.get("error"), execution_id=data.get("execution_id"),
            fingerprint=str(data.get("fingerprint") or ""),
        )


@dataclass
class BatchResult:
    """A finished batch: its lines in input order, counts, time and the mean metric score."""

    lines: list[BatchLine]
    elapsed_s: float
    ran: int
    reattached: int
    reused: int
    metric: str | None = None
    #: The program version this run is (lines it reused were produced by it).
    fingerprint: str = ""
    #: Lines that ran, per reason (``RAN_BECAUSE`` keys).
    ran_because: dict[str, int] = field(default_factory=dict)
    #: Lines that ran because another program version produced them, per that version's fingerprint.
    other_versions: dict[str, int] = field(default_factory=dict)

    def count(self, status: str) -> int:
        return sum(line.status == status for line in self.lines)

    @property
    def score(self) -> float | None:
        """Mean metric score in percent (failed lines score 0), as ``dspy.Evaluate`` reports it."""
        if self.metric is None or not self.lines:
            return None
        return round(100 * self.metric_total / len(self.lines), 2)

    @property
    def metric_total(self) -> float:
        return sum(line.score or 0.0 for line in self.lines)

    @property
    def lines_per_s(self) -> float:
        """Lines that ran (submitted or re-attached) per second of this run."""
        return (self.ran + self.reattached) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def usage(self) -> Usage:
        """LM usage of the lines that ran in this run (reused lines made no LM call)."""
        total = Usage()
        for line in self.lines:
            total = total + (line.usage or Usage())
        return total

    def summary(self) -> dict[str, Any]:
        """The batch as ``run --inputs-file ... --json`` prints it."""
        return {
            "usage": self.usage.to_json_dict(),
            "lines": len(self.lines),
            "succeeded": self.count(SUCCEEDED),
            "failed": self.count(FAILED),
            "invalid": self.count(INVALID),
            "cancelled": self.count(CANCELLED),
            "fingerprint": self.fingerprint,
            "ran": self.ran,
            "ran_because": self.ran_because,
            "other_versions": self.other_versions,
            "reattached": self.reattached,
            "reused": self.reused,
            "elapsed_s": round(self.elapsed_s, 3),
            "lines_per_s": round(self.lines_per_s, 2),
            "metric": None if self.metric is None else {
                "name": self.metric, "total": round(self.metric_total, 4), "score": self.score,
            },
        }

    def explain(self) -> str:
        """What was reused and why the rest ran, in one line."""
        plural = "s" if self.reused != 1 else ""
        reused = f"reused {self.reused} line{plural} of this program (fingerprint {self.fingerprint})"
        reasons = [f"{count} {RAN_BECAUSE[reason]}{self._versions() if reason == 'other_version' else ''}"
                   for reason, count in self.ran_because.items() if count]
        ran = f"ran {self.ran}" + (f": {', '.join(reasons)}" if reasons else "")
        attached = f"; re-attached {self.reattached} left running by an interrupted run" if self.reattached else ""
        return f"{reused}; {ran}{attached}"

    def _versions(self) -> str:
        shown = [fingerprint or "none recorded" for fingerprint in self.other_versions]
        return f" (fingerprint{'s' if len(shown) > 1 else ''} {', '.join(shown)})"


# --- program versions -----------------------------------------------------------------------------


def program_fingerprint(plan: Plan) -> str:
    """The program version a batch line belongs to: the program's fingerprint (its content), extended
    with the content of its modules' ``state:`` files, so a re-compiled program is another version."""
    states = sorted({module.state for module in plan.modules.values() if module.state})
    if not states:
        return plan.fingerprint
    digest = hashlib.sha256(plan.fingerprint.encode())
    for path in states:
        with contextlib.suppress(OSError):  # a missing file fails validation or the module, not this
            with open(path, "rb") as file:
                digest.update(hashlib.sha256(file.read()).digest())
    return digest.hexdigest()[:16]


class EarlierLines:
    """Lines of earlier runs, looked up by (index, program version, input key): what a run may reuse."""

    def __init__(self, lines: Mapping[int, BatchLine] | Iterable[BatchLine] | None = None) -> None:
        self._own: dict[tuple[int, str, str], BatchLine] = {}
        self._latest: dict[int, BatchLine] = {}
        for line in lines.values() if isinstance(lines, Mapping) else lines or ():
            self.add(line)

    def add(self, line: BatchLine) -> None:
        """A later line wins, except that a not-succeeded one never hides a succeeded one of the same
        version and input (a journal's ``submitted`` record after the output's result)."""
        slot = (line.index, line.fingerprint, line.key)
        known = self._own.get(slot)
        if not (known is not None and known.succeeded and not line.succeeded):
            self._own[slot] = line
        self._latest[line.index] = line

    def own(self, item: BatchItem, fingerprint: str) -> BatchLine | None:
        """The latest line this program version produced for this same input line."""
        return self._own.get((item.index, fingerprint, item.key))

    def latest(self, index: int) -> BatchLine | None:
        """The latest line at ``index``, whoever produced it."""
        return self._latest.get(index)


# --- input lines ----------------------------------------------------------------------------------


def line_key(data: Mapping[str, Any]) -> str:
    """A short content hash of an input line: a re-run reuses a result only for the same input."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def make_item(
    index: int, data: Any, plan: Plan, base: Mapping[str, Any] | None = None, line: int | None = None
) -> BatchItem:
    """Split one input mapping into program inputs and labels (on top of ``base`` inputs).

    ``line`` (default ``index + 1``) is the line number that error messages name.
    """
    where = f"line {line or index + 1}"
    if not isinstance(data, Mapping):
        return BatchItem(index, {}, {}, line_key({"line": data}), f"{where}: expected a JSON object")
    merged = {**(base or {}), **data}
    inputs = {name: value for name, value in merged.items() if name in plan.inputs}
    labels = {name: value for name, value in merged.items() if name not in plan.inputs}
    missing = [name for name in plan.inputs if name not in inputs]
    error = None
    if missing:
        error = (f"{where}: missing input {', '.join(missing)} "
                 f"(program '{plan.program}' takes {', '.join(plan.inputs)})")
    elif not _is_json(inputs):
        error = non_finite_input(inputs, f"{where}: input") or f"{where}: inputs must be JSON values"
    return BatchItem(index, inputs, labels, line_key(merged), error)


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return False
    return True


def batch_strategy(plan: Plan, requested: str | None) -> str:
    """The requested strategy, else ``dag`` for a chain (one module per level: a level barrier has
    nothing to wait for, and ``dag`` needs no chord and no stage task per line, and starts a group
    of lines in one round trip), else what :func:`choose_strategy` recommends."""
    if requested is None and all(len(level) == 1 for level in plan.levels):
        return "dag"
    return choose_strategy(plan, requested)


def resolve_metric(path: str) -> Metric:
    """The metric function named ``package.module:function`` (called as ``metric(example, prediction)``)."""
    try:
        return resolve_uses(path)
    except ImportError as exc:
        raise UsageError(f"metric '{path}' cannot be imported ({exc}): pass --metric package.module:function") from None


def metric_name(metric: Metric | None) -> str | None:
    return None if metric is None else getattr(metric, "__name__", type(metric).__name__)


# --- the run --------------------------------------------------------------------------------------


class BatchRun:
    """A batch being run: iterate :meth:`as_completed` or call :meth:`get` to drive it."""

    def __init__(
        self,
        runtime: Runtime,
        program: Program,
        inputs: Iterable[Mapping[str, Any] | BatchItem],
        *,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        strategy: str | None = None,
        timeout: float | None = None,
        metric: Metric | None = None,
        previous: Mapping[int, BatchLine] | Iterable[BatchLine] | None = None,
        on_submit: Callable[[BatchLine], None] | None = None,
        submit_threads: int = SUBMIT_THREADS,
        fresh: bool = False,
        use_profile: bool = True,
        learned_timeouts: bool | None = None,
    ) -> None:
        if max_in_flight < 1:
            raise UsageError(f"max_in_flight must be at least 1, got {max_in_flight}")
        self.runtime = runtime
        self.program = program
        # planned once, as submit_program plans each submission
        self.plan = profiled_plan(runtime, program, use_profile=use_profile, learned_timeouts=learned_timeouts)
        self.packages = program.packages()
        self.max_in_flight = max_in_flight
        self.strategy = batch_strategy(self.plan, strategy)
        self.timeout = timeout
        self.metric = metric
        self.fingerprint = program_fingerprint(self.plan)
        self.fresh = fresh
        self.previous = EarlierLines(None if fresh else previous)
        self.on_submit = on_submit
        self._items = self._as_items(inputs)
        self._pending: dict[str, tuple[BatchItem, float]] = {}
        self._results = ResultStream(runtime)  # one subscription for every execution in flight
        self._open: dict[str, BatchItem] = {}  # journaled executions whose line was not handed out yet
        self._submitting: dict[futures.Future[list[tuple[str, BatchItem]]], list[BatchItem]] = {}
        self._group: list[BatchItem] = []  # lines to submit together, once the group before them is out
        self._together = True  # groups go in one round trip (until launch_together says the strategy cannot)
        self._lock = threading.Lock()
        self.submit_threads = submit_threads
        self._started = time.monotonic()
        self._checked = self._started  # last look for results whose finisher died
        self.ran = 0
        self.reattached = 0
        self.reused = 0
        self.ran_because: Counter[str] = Counter()
        self._prepared = False
        self.other_versions: Counter[str] = Counter()

    def _as_items(self, inputs: Iterable[Mapping[str, Any] | BatchItem]) -> Iterator[BatchItem]:
        for index, data in enumerate(inputs):
            yield data if isinstance(data, BatchItem) else make_item(index, data, self.plan)

    @property
    def in_flight(self) -> int:
        """Executions submitted (or being submitted) whose result was not read yet."""
        return len(self._pending) + sum(map(len, self._submitting.values())) + len(self._group)

    @property
    def open_lines(self) -> int:
        """Lines whose execution this run submitted (or re-attached) and whose line it did not hand
        out yet: what :meth:`cancel` cancels."""
        return len(self._open)

    def as_completed(self) -> Iterator[BatchLine]:
        """Every line, in completion order, keeping at most ``max_in_flight`` executions running."""
        with ThreadPoolExecutor(self.submit_threads, thread_name_prefix="dspex-batch-submit") as pool:
            try:
                for item in self._items:
                    ready = self._without_running(item)
                    if ready is not None:
                        yield self._scored(ready, item)
                        continue
                    while self.in_flight >= self.max_in_flight:
                        self._flush(pool)
                        yield from self._collect(wait=True)
                    self._start(item, pool)
                    yield from self._collect(wait=False)
                self._flush(pool)
                while self.in_flight:
                    yield from self._collect(wait=True)
            finally:  # stopped early (Ctrl-C, consumer gone): submissions under way finish (journaled),
                pool.shutdown(wait=True, cancel_futures=True)  # queued ones never start
                self._drain()
                self._results.close()

    def get(self) -> BatchResult:
        """Run to the end; the lines in input order. Ctrl-C cancels the executions in flight."""
        try:
            lines = list(self.as_completed())
        except KeyboardInterrupt:
            self.cancel()
            raise
        return self.result(lines)

    def result(self, lines: Iterable[BatchLine]) -> BatchResult:
        """The finished batch of ``lines`` (sorted into input order), with this run's counts."""
        return BatchResult(
            sorted(lines, key=lambda line: line.index), time.monotonic() - self._started, self.ran,
            self.reattached, self.reused, metric_name(self.metric), self.fingerprint,
            dict(self.ran_because), dict(self.other_versions),
        )

    def cancel(self) -> list[BatchLine]:
        """Cancel every execution this run started whose line was not handed out yet (as
        ``dspex-celery cancel`` does); call it once iteration stopped (e.g. after Ctrl-C).

        Returns their lines: ``cancelled``, or what they ended with when they finished first. An
        execution whose result is not published yet keeps no line (a re-run re-attaches to it).
        """
        with self._lock:
            started = dict(self._open)
            self._open.clear()
            self._pending.clear()
        stored = [execution_id for execution_id in started if self.runtime.store.exists(execution_id)]
        for execution_id in stored:  # one never stored never runs
            cancel_execution(self.runtime, execution_id)
        lines = []
        for execution_id, meta in self.runtime.app.backend.get_many(stored, interval=0, max_iterations=1):
            item = started[execution_id]
            lines.append(self._scored(self._line_from_meta(item, execution_id, meta), item))
        return lines

    # --- one line ---

    def _without_running(self, item: BatchItem) -> BatchLine | None:
        """The line's outcome when it needs no new execution: invalid, or reused from ``previous``
        (only a line this same program version produced from this same input line)."""
        if item.error is not None:
            return BatchLine(item.index, item.key, INVALID, error=item.error, fingerprint=self.fingerprint)
        earlier = self.previous.own(item, self.fingerprint)
        if earlier is not None and earlier.succeeded:
            self.reused += 1
            return BatchLine(item.index, item.key, SUCCEEDED, earlier.outputs, None, earlier.execution_id,
                             fingerprint=self.fingerprint, reused=True)
        return None

    def _count_why_it_runs(self, item: BatchItem) -> None:
        """Count why ``item`` runs instead of being reused (``RAN_BECAUSE``)."""
        earlier = self.previous.own(item, self.fingerprint)
        latest = self.previous.latest(item.index)
        if self.fresh:
            reason = "fresh"
        elif earlier is not None:
            reason = {FAILED: "failed", INVALID: "failed", CANCELLED: "cancelled"}.get(earlier.status, "new")
        elif latest is None:
            reason = "new"
        elif latest.fingerprint != self.fingerprint:
            reason = "other_version"
            self.other_versions[latest.fingerprint] += 1
        else:
            reason = "input_changed"
        self.ran_because[reason] += 1

    def _start(self, item: BatchItem, pool: ThreadPoolExecutor) -> None:
        """Re-attach to the line's earlier execution, or submit it: the first one inline, the others
        from the pool, in groups: lines that come while a group is being submitted go together in
        the next one (one round trip for a group when the strategy can, see ``launch_together``)."""
        execution_id = self._reattachable(item)
        if execution_id is not None:
            self.reattached += 1
            self._journal(item, execution_id)
            self._track(execution_id, item)
            return
        self._count_why_it_runs(item)
        if self.ran == 0 and not self._submitting:
            for execution_id, launched in self._launch([item]):
                self._track(execution_id, launched)
            return
        self._group.append(item)
        if not self._together or not self._submitting:
            self._flush(pool)

    def _flush(self, pool: ThreadPoolExecutor) -> None:
        """Submit the lines waiting to go together, from the pool."""
        if self._group:
            group, self._group = self._group, []
            self._submitting[pool.submit(self._launch, group)] = group

    def _launch(self, items: list[BatchItem]) -> list[tuple[str, BatchItem]]:
        """Submit lines (in a pool thread), journaling their execution ids before anything is
        stored, so a re-run after a kill finds every execution this client may have created."""
        if not self._prepared:  # the first line: a refused program or an unreachable broker journals nothing
            check_visibility_timeout(self.runtime, self.plan)
            prepare_runtime(self.runtime, self.packages, self.plan)
            self._prepared = True
        launched = {new_execution_id(): item for item in items}
        for execution_id, item in launched.items():
            self._journal(item, execution_id)
        inputs = {execution_id: item.inputs for execution_id, item in launched.items()}
        if not (self._together and launch_together(self.runtime, self.plan, inputs, self.strategy, self.timeout)):
            self._together = False  # one line per submission, several at once from the pool
            for execution_id, item in launched.items():
                launch(self.runtime, self.plan, self.packages, item.inputs, self.strategy, self.timeout,
                       execution_id=execution_id)
        with self._lock:
            self.ran += len(launched)
        return list(launched.items())

    def _journal(self, item: BatchItem, execution_id: str) -> None:
        with self._lock:
            self._open[execution_id] = item
            if self.on_submit is not None:
                self.on_submit(BatchLine(item.index, item.key, SUBMITTED, execution_id=execution_id,
                                         fingerprint=self.fingerprint))

    def _reattachable(self, item: BatchItem) -> str | None:
        """The execution an interrupted run of this program version submitted for this same line, if
        the store still has it and it was not cancelled."""
        earlier = self.previous.own(item, self.fingerprint)
        if earlier is None or earlier.status != SUBMITTED or not earlier.execution_id:
            return None
        meta = self.runtime.store.meta(earlier.execution_id)
        if not meta or self._cancelled(earlier.execution_id, meta):
            return None  # killed before it was stored (nothing ran), or cancelled: run it again
        if not meta.get("started") and not self.runtime.store.is_finished(earlier.execution_id):
            start_execution(self.runtime, earlier.execution_id, meta.get("strategy", self.strategy))
        return earlier.execution_id

    def _cancelled(self, execution_id: str, meta: Mapping[str, Any]) -> bool:
        """True when the execution was cancelled: published so, or only claimed so by a client that
        was killed before it published (a second Ctrl-C while cancelling)."""
        if meta.get("status") == ExecutionStatus.CANCELLED.value:
            return True
        claim = self.runtime.store.finish_claim(execution_id)
        return claim is not None and claim.get("status") == ExecutionStatus.CANCELLED.value

    def _harvest(self, *, wait: bool) -> None:
        """Move finished submissions to the pending executions (a failed submission raises here)."""
        if not self._submitting:
            return
        done, _ = futures.wait(self._submitting, timeout=POLL_S if wait else 0, return_when=futures.FIRST_COMPLETED)
        for future in done:
            self._submitting.pop(future)
            for execution_id, item in future.result():
                self._track(execution_id, item)

    def _track(self, execution_id: str, item: BatchItem) -> None:
        """Wait for ``execution_id``'s result (the line of ``item``)."""
        self._pending[execution_id] = (item, time.monotonic())
        self._results.add(execution_id)

    def _drain(self) -> None:
        """Iteration stopped: forget the submissions (finished, failed or never started); the
        executions they created are in ``_open`` for :meth:`cancel` or a re-run's journal."""
        self._submitting.clear()
        self._group.clear()  # never journaled, never stored

    def _collect(self, *, wait: bool) -> Iterator[BatchLine]:
        """Finished executions' lines; with ``wait``, polls until at least one finished."""
        while self.in_flight:
            self._harvest(wait=wait and not self._pending)
            if not self._pending:
                if wait:
                    continue
                return
            self._end_overdue()
            found = self._results.take(POLL_S if wait else 0)
            for execution_id, meta in found:
                if execution_id not in self._pending:  # its line ended meanwhile (cancel)
                    continue
                item, _ = self._pending.pop(execution_id)
                with self._lock:
                    self._open.pop(execution_id, None)
                yield self._scored(self._line_from_meta(item, execution_id, meta), item)
            if found or not wait:
                return

    def _end_overdue(self) -> None:
        """End lines past the timeout; every few seconds, publish results whose finisher died."""
        now = time.monotonic()
        if now - self._checked >= TAKEOVER_CHECK_S:
            self._checked = now
            for execution_id in self.runtime.store.finished_of(list(self._pending)):  # claimed, maybe not published
                Execution(self.runtime, execution_id).publish_abandoned()
        if self.timeout is None:
            return
        for execution_id, (_, started) in self._pending.items():
            if now - started > self.timeout:
                timed_out = f"timed out after {self.timeout:g} s"
                Execution(self.runtime, execution_id).finish(ExecutionStatus.FAILED, timed_out)

    def _scored(self, line: BatchLine, item: BatchItem) -> BatchLine:
        """``line`` with its metric score: failed lines score 0, like ``dspy.Evaluate``."""
        if self.metric is None:
            return line
        if not line.succeeded:
            line.score = 0.0
            return line
        try:
            line.score = float(self.metric(make_example(item.inputs, item.labels), make_prediction(line.outputs or {})))
        except Exception as exc:  # a user metric may raise anything; the line scores 0
            line.score, line.metric_error = 0.0, f"{type(exc).__name__}: {exc}"
        return line


    def _line_from_meta(self, item: BatchItem, execution_id: str, meta: Mapping[str, Any]) -> BatchLine:
        """The line of a finished execution (its Celery result ``meta``)."""
        line = BatchLine(item.index, item.key, FAILED, execution_id=execution_id, fingerprint=self.fingerprint)
        if meta.get("status") != states.SUCCESS:
            line.error = f"execution ended with {meta.get('status')}"
            return line
        result = ExecutionResult.model_validate(meta["result"])
        line.outputs = result.outputs or None
        line.usage = total_usage(result.modules.values())
        if result.succeeded:
            line.status, line.outputs = SUCCEEDED, result.outputs
        elif result.status is ExecutionStatus.CANCELLED:
            line.status, line.error = CANCELLED, result.error or "cancelled"
        else:
            line.error = describe_failure(result)
        return line


def submit_batch(
    program: ProgramLike,
    inputs: Iterable[Mapping[str, Any] | BatchItem],
    *,
    app: Any = None,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    strategy: str | None = None,
    timeout: float | None = None,
    metric: Metric | str | None = None,
    previous: Mapping[int, BatchLine] | Iterable[BatchLine] | None = None,
    on_submit: Callable[[BatchLine], None] | None = None,
    submit_threads: int = SUBMIT_THREADS,
    fresh: bool = False,
    use_profile: bool = True,
    learned_timeouts: bool | None = None,
) -> BatchRun:
    """Run ``program`` once per input mapping across the cluster (embedded when none is configured).

    Nothing runs until the returned :class:`BatchRun` is iterated (``as_completed()``) or
    ``get()`` is called; at most ``max_in_flight`` executions are submitted and unfinished at once.
    ``timeout`` bounds each execution (seconds); ``metric`` (a callable or ``"pkg.mod:fn"``) scores
    each succeeded line as ``metric(example, prediction)``; ``previous`` lines (an earlier run's
    ``BatchResult.lines``, or an interrupted run's lines) are reused or re-attached when this same
    program version (:func:`program_fingerprint`) produced them from the same input line;
    ``fresh`` ignores them (every line runs); ``on_submit`` is called (under a lock, maybe from a
    submitting thread) with each line's execution id as soon as it is submitted; ``use_profile`` and
    ``learned_timeouts`` are :func:`~dspex_celery.client.submit_program`'s.
    """
    runtime = runtime_of(app) if app is not None else default_runtime()
    chosen = resolve_metric(metric) if isinstance(metric, str) else metric
    run = BatchRun(
        runtime, Program.coerce(program), inputs, max_in_flight=max_in_flight, strategy=strategy,
        timeout=timeout, metric=chosen, previous=previous, on_submit=on_submit, submit_threads=submit_threads,
        fresh=fresh, use_profile=use_profile, learned_timeouts=learned_timeouts,
    )
    with contextlib.suppress(redis.RedisError):  # unreachable: the first submission says so, in one line
        warn_if_unserved(runtime, run.plan)
    return run
