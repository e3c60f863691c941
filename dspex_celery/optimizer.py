"""The optimizer: per-module statistics from history, the critical path by observed durations,
bottlenecks, learned timeouts and retries, each resource class's slots (the most modules of it seen
running at once), a strategy advice, and a profile later runs use (its priorities always; its timeouts
only when learned timeouts are turned on).

Numbers are over the finished executions of one program fingerprint, counting only attempts
that really ran (``reused`` ones from a resume are left out). Durations are those of successful
attempts. Percentiles interpolate linearly between closest ranks (numpy's default method).
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from dspex_celery.errors import UsageError
from dspex_celery.graph import critical_path, remaining_path_lengths
from dspex_celery.history.models import AttemptRow
from dspex_celery.history.store import (
    HistoryStore,
    history_url,
    open_history,
    sqlite_path,
)
from dspex_celery.plan import Plan
from dspex_celery.results import ModuleRecord
from dspex_celery.settings import Settings, redact
from dspex_celery.usage import total_usage

if TYPE_CHECKING:
    import networkx as nx

    from dspex_celery.program import Program

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Successful samples a module needs before a timeout is learned for it (fewer say little about p99).
MIN_TIMEOUT_SAMPLES = 3
#: Learned timeout = max(p99 x factor, p99 + floor): room for slow days, and for scheduling jitter
#: on modules that take milliseconds.
TIMEOUT_FACTOR = 1.5
TIMEOUT_FLOOR_S = 1.0
#: Learned ``backup_after_s`` = p95 x factor, at least the floor: an attempt that much slower than
#: usual is a straggler worth a backup (one of milliseconds is not worth the message).
BACKUP_P95_FACTOR = 2.0
BACKUP_FLOOR_S = 1.0
#: Never recommend more attempts than this.
MAX_RECOMMENDED_ATTEMPTS = 10
#: ``dag`` is advised when level barriers would lengthen the run by more than this share.
DAG_ADVICE_THRESHOLD = 0.10
#: Bottlenecks listed.
TOP_BOTTLENECKS = 5
#: How long a history database that failed to open is not asked again for profiles.
PROFILE_RETRY_S = 60.0
#: Finished executions that give expected durations (progress ETA) when no profile is saved.
RECENT_EXECUTIONS = 20
#: How to turn learned timeouts off, by what turned them on (see :func:`learned_timeouts_hint`).
OFF_HINTS = {
    "run": "set timeout_s in the program or run without --learned-timeouts",
    "program": "set timeout_s in the program or drop its 'timeouts: learned'",
    "settings": "set timeout_s in the program or turn off learned_timeouts (DSPEX_LEARNED_TIMEOUTS)",
}


def percentile(values: Sequence[float], q: int) -> float:
    """The ``q``-th percentile (0..100), linear interpolation between closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    if len(values) == 1:  # statistics.quantiles needs two points (before Python 3.13)
        return float(values[0])
    cuts = statistics.quantiles(values, n=100, method="inclusive")  # the 1st..99th percentiles
    return float([min(values), *cuts, max(values)][q])


@dataclass(frozen=True)
class ModuleStats:
    """What history says about one module."""

    runs: int
    attempts: int
    samples: int  # successful attempts: the durations the percentiles are of
    p50_s: float | None
    p95_s: float | None
    p99_s: float | None
    failure_rate: float
    retry_rate: float
    recommended_timeout_s: float | None
    recommended_retry: dict[str, int] | None
    tokens_per_run: float | None = None  # LM tokens (prompt + completion) per run, all its attempts
    cost_per_run: float | None = None  # USD per run, where DSPy priced the calls
    lm_cache_hits: int = 0  # LM requests the shared cache answered, over all runs
    lm_cache_misses: int = 0


@dataclass(frozen=True)
class Bottleneck:
    """A module on the critical path and how much shorter the path gets if it took no time."""

    module: str
    p50_s: float
    saving_s: float


@dataclass(frozen=True)
class StrategyAdvice:
    recommended: str
    levels_estimate_s: float
    critical_path_s: float
    reason: str


@dataclass(frozen=True)
class Report:
    """The optimizer's findings for one program fingerprint."""

    program: str
    fingerprint: str
    executions: int
    modules: dict[str, ModuleStats]
    critical_path: list[str]
    critical_path_s: float
    bottlenecks: list[Bottleneck]
    strategy: StrategyAdvice
    profile: dict[str, Any] = field(default_factory=dict)
    saved: bool = False  # False: analysed only (``optimize --dry-run``), the stored profile is unchanged

    def to_json_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- analysis (pure) ------------------------------------------------------------------------------


def analyze(plan: Plan, attempts: Iterable[AttemptRow], executions: int) -> Report:
    """The report for ``plan`` from its attempt rows (of ``executions`` finished executions)."""
    by_module: dict[str, list[AttemptRow]] = defaultdict(list)
    for row in attempts:
        if row.attempt >= 1 and not row.reused and row.module in plan.modules:
            by_module[row.module].append(row)
    modules = {name: module_stats(plan, name, by_module.get(name, [])) for name in plan.modules}
    weights = {name: stats.p50_s for name, stats in modules.items() if stats.p50_s is not None}
    graph = plan_graph(plan)
    path = critical_path(graph, weights)
    length = path_length(graph, weights)
    learned = {name: stats for name, stats in modules.items() if stats.recommended_timeout_s is not None}
    profile = {
        "weights": weights,
        "timeouts": {name: stats.recommended_timeout_s for name, stats in learned.items()},
        "timeout_basis": {name: {"p99_s": stats.p99_s, "samples": stats.samples} for name, stats in learned.items()},
        "backups": {name: learned_backup(stats.p95_s) for name, stats in modules.items()
                    if stats.p95_s is not None and stats.samples >= MIN_TIMEOUT_SAMPLES},
        "critical_path": path,
        "slots": learned_slots(_spans(row for rows in by_module.values() for row in rows)),
    }
    advice = advise_strategy(plan, weights, length)
    profile["strategy"] = advice.recommended
    return Report(
        program=plan.program,
        fingerprint=plan.fingerprint,
        executions=executions,
        modules=modules,
        critical_path=path,
        critical_path_s=length,
        bottlenecks=bottlenecks(graph, weights, path),
        strategy=advice,
        profile=profile,
    )


#: An attempt as slot counts are learned from: (execution id, resource class, started, finished).
Span = tuple[str, str, datetime, datetime]


def _spans(rows: Iterable[AttemptRow]) -> Iterator[Span]:
    """The attempts that ran, as :func:`learned_slots` counts them."""
    for row in rows:
        if row.resource and row.started_at is not None and row.finished_at is not None:
            yield row.execution_id, row.resource, row.started_at, row.finished_at


def learned_slots(spans: Iterable[Span]) -> dict[str, int]:
    """Per resource class, the most attempts that ran at the same time in one execution: the slots it
    had (at least; an execution that never filled them shows fewer)."""
    events: dict[tuple[str, str], list[tuple[datetime, int]]] = defaultdict(list)
    for execution_id, resource, started, finished in spans:
        events[execution_id, resource] += [(started, 1), (finished, -1)]
    slots: dict[str, int] = {}
    for (_, resource), changes in events.items():
        running = peak = 0
        for _, change in sorted(changes):  # at one instant an end (-1) comes before a start
            running += change
            peak = max(peak, running)
        slots[resource] = max(slots.get(resource, 0), peak)
    return dict(sorted(slots.items()))


def module_stats(plan: Plan, name: str, rows: list[AttemptRow]) -> ModuleStats:
    runs: dict[str, list[AttemptRow]] = defaultdict(list)
    for row in rows:
        runs[row.execution_id].append(row)
    durations = [row.duration_s for row in rows if row.status == "succeeded" and row.duration_s is not None]
    finals = [max(run, key=lambda row: row.attempt) for run in runs.values()]
    count = len(runs)
    p99 = percentile(durations, 99) if durations else None
    usage = total_usage(ModuleRecord.model_validate(row.record) for row in finals if row.record is not None)
    return ModuleStats(
        runs=count,
        attempts=len(rows),
        samples=len(durations),
        p50_s=percentile(durations, 50) if durations else None,
        p95_s=percentile(durations, 95) if durations else None,
        p99_s=p99,
        failure_rate=_share(sum(row.status == "failed" for row in finals), count),
        retry_rate=_share(sum(len(run) > 1 for run in runs.values()), count),
        recommended_timeout_s=learned_timeout(p99) if len(durations) >= MIN_TIMEOUT_SAMPLES else None,
        recommended_retry=recommended_retry(plan, name, list(runs.values())),
        tokens_per_run=round(usage.tokens / count, 1) if count and not usage.empty else None,
        cost_per_run=None if usage.cost is None or not count else usage.cost / count,
        lm_cache_hits=usage.cache_hits,
        lm_cache_misses=usage.cache_misses,
    )


def learned_timeout(p99: float | None) -> float | None:
    """``timeout_s`` from an observed p99, with headroom, rounded up to 0.1 s."""
    if p99 is None:
        return None
    return math.ceil(max(p99 * TIMEOUT_FACTOR, p99 + TIMEOUT_FLOOR_S) * 10) / 10


def learned_backup(p95: float) -> float:
    """``backup_after_s`` from an observed p95, rounded up to 0.1 s."""
    return math.ceil(max(p95 * BACKUP_P95_FACTOR, BACKUP_FLOOR_S) * 10) / 10


def timeout_basis(p99_s: float, samples: int) -> str:
    """How a learned timeout came from its p99, e.g. ``p99 2.5 s of 40 runs × 1.5``."""
    headroom = f"× {TIMEOUT_FACTOR:g}" if p99_s * TIMEOUT_FACTOR >= p99_s + TIMEOUT_FLOOR_S else f"+ {TIMEOUT_FLOOR_S:g} s"
    return f"p99 {p99_s:.3g} s of {samples} runs {headroom}"


def recommended_retry(plan: Plan, name: str, runs: list[list[AttemptRow]]) -> dict[str, int] | None:
    """More attempts than any run needed (one spare), when retries happened at all; else None."""
    needed = max((len(run) for run in runs), default=0)
    if needed <= 1:
        return None
    current = int(plan.modules[name].retry.get("max_attempts", 1))
    exhausted = any(len(run) >= current and max(run, key=lambda r: r.attempt).status == "failed" for run in runs)
    attempts = max(needed + 1, current + 1 if exhausted else current)
    return {"max_attempts": min(MAX_RECOMMENDED_ATTEMPTS, attempts)}


def plan_graph(plan: Plan) -> nx.DiGraph:
    import networkx as nx  # not at import: submissions load profiles through this module

    graph = nx.DiGraph()
    graph.add_nodes_from(plan.modules)
    graph.add_edges_from((parent, name) for name, module in plan.modules.items() for parent in module.parents)
    return graph


def path_length(graph: nx.DiGraph, weights: Mapping[str, float]) -> float:
    """Length of the longest path by ``weights`` (modules without a weight count 0)."""
    return max(remaining_path_lengths(graph, weights).values(), default=0.0)


def bottlenecks(graph: nx.DiGraph, weights: Mapping[str, float], path: list[str]) -> list[Bottleneck]:
    """Critical-path modules ranked by how much the longest path shrinks if each took no time."""
    length = path_length(graph, weights)
    found = []
    for name in path:
        saving = length - path_length(graph, {**weights, name: 0.0})
        if saving > 0:
            found.append(Bottleneck(name, weights.get(name, 0.0), saving))
    found.sort(key=lambda item: (-item.saving_s, item.module))
    return found[:TOP_BOTTLENECKS]


def advise_strategy(plan: Plan, weights: Mapping[str, float], path_s: float) -> StrategyAdvice:
    """``dag`` when level barriers would add more than 10 % to the critical path, else ``levels``."""
    levels_s = sum(max((weights.get(name, 0.0) for name in level), default=0.0) for level in plan.levels)
    extra = levels_s - path_s
    if path_s > 0 and extra > DAG_ADVICE_THRESHOLD * path_s:
        reason = f"level barriers add {extra:.3f} s ({extra / path_s:.0%}) to the {path_s:.3f} s critical path"
        return StrategyAdvice("dag", levels_s, path_s, reason)
    reason = f"level barriers add {max(extra, 0.0):.3f} s to the {path_s:.3f} s critical path"
    return StrategyAdvice("levels", levels_s, path_s, reason)


def _share(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


# --- with a history database ----------------------------------------------------------------------


def optimize(history: HistoryStore, program: str, fingerprint: str | None = None, *, save: bool = True) -> Report:
    """Analyse the finished executions of ``program`` (its latest fingerprint) and save the profile
    (``save=False``: only analyse; the stored profile stays as it is)."""
    fingerprint = fingerprint or history.latest_fingerprint(program)
    if fingerprint is None:
        raise UsageError(f"no executions of program '{program}' in the history at {history.display_url}: run it first")
    plan = history.plan(fingerprint)
    executions = history.finished_executions(fingerprint)
    if plan is None or not executions:
        raise UsageError(
            f"no finished executions of program '{program}' (fingerprint {fingerprint}) in the history at "
            f"{history.display_url}: wait for one to finish"
        )
    report = analyze(plan, history.attempts([row.id for row in executions]), len(executions))
    if not save:
        return report
    history.save_profile(fingerprint, plan.program, len(executions), report.profile)
    return replace(report, saved=True)


@dataclass(frozen=True)
class Profile:
    """What a submission learns from history: weights (seconds per module), timeouts and their basis,
    and the slots each resource class had."""

    weights: dict[str, float]
    timeouts: dict[str, float]
    basis: dict[str, dict[str, Any]] = field(default_factory=dict)
    backups: dict[str, float] = field(default_factory=dict)  # learned backup_after_s per module
    slots: dict[str, int] = field(default_factory=dict)  # per resource class

    def timeout_sources(self, off_hint: str) -> dict[str, str]:
        """Per learned timeout: where it came from and ``off_hint`` (how to turn it off)."""
        return {name: f"{self._basis_of(name)}, from optimize; {off_hint}" for name in self.timeouts}

    def _basis_of(self, name: str) -> str:
        basis = self.basis.get(name)
        if not basis or basis.get("p99_s") is None:  # a profile saved before bases were
            return "learned from history"
        return timeout_basis(float(basis["p99_s"]), int(basis.get("samples", 0)))


_unavailable: dict[str, float] = {}


def read_history(settings: Settings, read: Callable[[HistoryStore], T]) -> T | None:
    """``read(history)``, or None when history is off, absent or failing (never raises)."""
    url = history_url(settings)
    if url is None or time.monotonic() < _unavailable.get(url, 0.0):
        return None
    path = sqlite_path(url)
    if path is not None and not path.exists():
        return None
    try:
        return read(open_history(url, create=False))
    except Exception as exc:  # a history outage must not stop submissions
        log.warning("cannot read history from %s (%s); going on without it", redact(url), exc)
        _unavailable[url] = time.monotonic() + PROFILE_RETRY_S
        return None


def load_profile(settings: Settings, fingerprint: str) -> Profile | None:
    """The saved profile of ``fingerprint``; None when there is none or history cannot be read."""
    data = read_history(settings, lambda history: history.profile(fingerprint))
    if data is None:
        return None
    return Profile(dict(data.get("weights", {})), dict(data.get("timeouts", {})), dict(data.get("timeout_basis", {})),
                   dict(data.get("backups", {})), {str(k): int(v) for k, v in data.get("slots", {}).items()})


def expected_durations(settings: Settings, plan: Plan) -> dict[str, float] | None:
    """Seconds per module: the saved profile's, else p50s of the last recent runs (None: no history)."""
    profile = load_profile(settings, plan.fingerprint)
    if profile is not None:
        return profile.weights
    return read_history(settings, lambda history: _recent_weights(history, plan))


def _recent_weights(history: HistoryStore, plan: Plan) -> dict[str, float] | None:
    executions = history.finished_executions(plan.fingerprint)[-RECENT_EXECUTIONS:]
    if not executions:
        return None
    weights = analyze(plan, history.attempts([row.id for row in executions]), len(executions)).profile["weights"]
    return dict(weights)


def apply_profile(settings: Settings, program: Program, plan: Plan, *, learned_timeouts: bool | None = None) -> Plan:
    """``plan`` re-planned with its fingerprint's profile, if any: its priorities, and its timeouts and
    backup thresholds (``backup_after_s``) where the program sets none when learned timeouts are on
    (see :func:`learned_timeouts_hint`)."""
    profile = load_profile(settings, plan.fingerprint)
    if profile is None:
        return plan
    off_hint = learned_timeouts_hint(settings, program, learned_timeouts)
    if off_hint is None or not (profile.timeouts or profile.backups):
        return program.plan(weights=profile.weights)
    return program.plan(weights=profile.weights, learned_timeouts=profile.timeouts,
                        timeout_sources=profile.timeout_sources(off_hint), learned_backups=profile.backups)


def learned_timeouts_hint(settings: Settings, program: Program, requested: bool | None) -> str | None:
    """None when learned timeouts are off, else how to turn them off. The first that says decides:
    ``requested`` (``run --learned-timeouts``), the program's ``timeouts:``, the ``learned_timeouts`` setting."""
    if requested is not None:
        return OFF_HINTS["run"] if requested else None
    if program.spec.timeouts is not None:
        return OFF_HINTS["program"] if program.spec.timeouts == "learned" else None
    return OFF_HINTS["settings"] if settings.learned_timeouts else None
