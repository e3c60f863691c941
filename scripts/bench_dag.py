"""DAG strategy benchmark (issue 5): makespan / LB, per-module overhead, throughput and planner time.

    .venv/bin/python scripts/bench_dag.py [--quick] [--only hetero|overhead|throughput|planner]...

Starts two `dspex-celery worker` subprocesses (resource class ``default``, threads pool, concurrency 4:
8 slots; ``--include bench_raw_tasks bench_dag_tasks`` for the raw-canvas baselines) in a fresh
namespace on real Redis. Every comparison runs side by side in interleaved rounds (order rotated
each round); it prints one table and writes it to docs/benchmarks.md ("DAG strategy (issue 5)").
``--quick`` (a smoke run of about a minute: smaller programs, one round) and ``--only`` (some parts)
do not write the docs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import benchlib as bench
import redis
from bench_dag_tasks import SLEEP
from bench_raw_tasks import NOOP
from celery import Celery, chain, chord, group
from celery.canvas import Signature

from dspex_celery import (
    ExecutionStatus,
    Program,
    Settings,
    create_runtime,
    submit_program,
)
from dspex_celery.canvas import module_signature, stage_signature
from dspex_celery.examples import synthetic
from dspex_celery.plan import Plan
from dspex_celery.results import ExecutionResult, parse_time
from dspex_celery.routing import queue_name
from dspex_celery.runtime import Runtime

HEADING = "DAG strategy (issue 5)"
WORKERS = [bench.WorkerSpec(("default",), concurrency=4, pool="threads",
                            includes=("bench_raw_tasks", "bench_dag_tasks"))] * 2
SLOTS = sum(spec.concurrency for spec in WORKERS)
SEED = 1
DURATIONS_MS = (10.0, 300.0)
RUN_TIMEOUT_S = 180.0
SUBMIT_THREADS = 4
RAW = "raw canvas"
FLOOR = "Celery floor"
PROFILED = " + learned profile"
HETERO_STRATEGIES = ("levels", "dag", "dag" + PROFILED, RAW, FLOOR)
LEARNING_RUNS = 3  # recorded dag runs per program before `optimize` learns its profile
DAG_GOAL = 1.08  # dag makespan <= 1.08 x LB
LEVELS_VS_RAW_GOAL = 1.02  # levels makespan <= 1.02 x raw canvas
FLAT_GOAL = 0.20  # per-module cost within +-20 % from small to large
PLAN_GOAL_MS, COMPILE_GOAL_MS = 5.0, 50.0


@dataclass(frozen=True)
class Config:
    """Sizes, repeats and time budgets of one invocation."""

    hetero_sizes: tuple[int, ...]
    small: int
    large: int
    executions: int
    planner_size: int
    planner_repeats: int
    rounds: int
    raw_timeout_s: float
    sequential_large: bool  # sequential on deep at the large size too (about 40 ms per module)

    def shapes(self) -> dict[str, dict[int, tuple[int, int]]]:
        """(levels, width) per shape and size: deep = 5 wide, wide = 10 levels."""
        return {
            "deep": {size: (size // 5, 5) for size in (self.small, self.large)},
            "wide": {size: (10, size // 10) for size in (self.small, self.large)},
        }


FULL = Config(hetero_sizes=(60, 300), small=100, large=1000, executions=100, planner_size=1000,
              planner_repeats=9, rounds=3, raw_timeout_s=15.0, sequential_large=False)
QUICK = Config(hetero_sizes=(60,), small=50, large=150, executions=30, planner_size=1000,
               planner_repeats=3, rounds=1, raw_timeout_s=8.0, sequential_large=True)
HETERO_TIMEOUT_S = 60.0

CLUSTER_PARTS = ("hetero", "overhead", "throughput")  # on the workers; "planner" runs in this process
PARTS = (*CLUSTER_PARTS, "planner")
OVERHEAD_STRATEGIES = {"deep": ("levels", "sequential", "dag", RAW), "wide": ("levels", "dag", RAW)}


@dataclass
class Row:
    """One line of the table."""

    measure: str
    case: str
    strategy: str
    value: str
    ratio: str = ""
    cpu: str = ""
    goal: str = ""
    verdict: str = ""

    def cells(self) -> list[str]:
        return [self.measure, self.case, self.strategy, self.value, self.ratio, self.cpu, self.goal, self.verdict]


HEADERS = ["measure", "case", "strategy", "median [min–max]", "ratios (of medians)", "worker CPU", "goal",
           "verdict"]


# --- worker CPU ---------------------------------------------------------------------------------


def worker_cpu_s(cluster: bench.BenchCluster) -> float:
    """CPU seconds (user + system) the worker processes have used so far (threads pool: one process each)."""
    total = 0
    for worker in cluster.workers:
        fields = Path(f"/proc/{worker.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
    return total / os.sysconf("SC_CLK_TCK")


@dataclass
class CpuMeter:
    """Worker CPU seconds of every run of every case, kept beside the timings."""

    cluster: bench.BenchCluster
    seconds: dict[str, list[float]] = field(default_factory=dict)

    def wrap(self, cases: dict[str, Callable[[], float]]) -> dict[str, Callable[[], float]]:
        return {name: partial(self._measured, name, case) for name, case in cases.items()}

    def _measured(self, name: str, case: Callable[[], float]) -> float:
        before = worker_cpu_s(self.cluster)
        value = case()
        self.seconds.setdefault(name, []).append(worker_cpu_s(self.cluster) - before)
        return value

    def per(self, name: str, count: int, unit: str) -> str:
        """Median worker CPU milliseconds per module (or execution) of a case."""
        values = self.seconds.get(name)
        return f"{statistics.median(values) * 1000 / count:.1f} ms/{unit}" if values else ""


# --- running things -----------------------------------------------------------------------------


def run_program(cluster: bench.BenchCluster, program: dict[str, Any], strategy: str,
                timeout: float = RUN_TIMEOUT_S, profiled: Runtime | None = None) -> tuple[float, ExecutionResult]:
    """Submit ``program``, wait for it: wall seconds from submit to result, and the result.

    ``profiled``: submit through this runtime (whose history has the program's learned profile) with
    ``use_profile=True``; otherwise without a profile.
    """
    start = time.perf_counter()
    runtime = profiled or cluster.runtime
    handle = submit_program(Program.from_dict(program), {}, strategy=strategy, app=runtime.app,
                            use_profile=profiled is not None)
    result = handle.get(timeout=timeout)
    wall = time.perf_counter() - start
    if result.status is not ExecutionStatus.SUCCEEDED:
        raise RuntimeError(f"{program['name']} ({strategy}) {result.status.value}: {result.error}")
    return wall, result


def module_times(result: ExecutionResult) -> dict[str, tuple[float, float]]:
    """Epoch (start, end) of every module, from its record."""
    return {name: (parse_time(record.started_at).timestamp(), parse_time(record.finished_at).timestamp())
            for name, record in result.modules.items() if record.started_at and record.finished_at}


def makespan(times: dict[str, tuple[float, float]]) -> float:
    """First module start to last module end, seconds."""
    return max(end for _, end in times.values()) - min(start for start, _ in times.values())


def hop_gaps_ms(plan: Plan, times: dict[str, tuple[float, float]]) -> list[float]:
    """For each module with parents: its start minus its last parent's end (dispatch latency + waiting)."""
    return [(times[name][0] - max(times[parent][1] for parent in module.parents)) * 1000
            for name, module in plan.modules.items() if module.parents]


def raw_canvas(app: Celery, queue: str, levels: Sequence[Sequence[tuple[str, float]]],
               times_key: str | None) -> Signature:
    """A hand-written chain of chords, one chord per level with a no-op body.

    With ``times_key`` the header tasks sleep their ms and record start/end there; without, they are
    the plain no-op task of ``bench_raw_tasks``.
    """

    def task(name: str, ms: float) -> Signature:
        if times_key is None:
            return app.signature(NOOP, immutable=True, queue=queue)
        return app.signature(SLEEP, args=(ms, times_key, name), immutable=True, queue=queue)

    body = partial(app.signature, NOOP, immutable=True, queue=queue)
    return chain(*[chord(group([task(name, ms) for name, ms in level]), body()) for level in levels])


def run_raw(cluster: bench.BenchCluster, levels: Sequence[Sequence[tuple[str, float]]], timeout: float,
            record: bool) -> tuple[float, dict[str, tuple[float, float]]]:
    """Wall seconds of a raw canvas (build to last chord body's result), and its task times if recorded."""
    times_key = f"{cluster.namespace}:rawtimes:{uuid.uuid4().hex}" if record else None
    start = time.perf_counter()
    canvas = raw_canvas(cluster.runtime.app, queue_name(cluster.namespace, "default"), levels, times_key)
    canvas.apply_async().get(timeout=timeout)
    wall = time.perf_counter() - start
    return wall, {} if times_key is None else _recorded_times(cluster, times_key)


def run_floor(cluster: bench.BenchCluster, hetero: Hetero, timeout: float) -> tuple[float, float]:
    """What plain Celery reaches with no dependency tracking at all: the makespans of a chain of the
    critical path's sleeps and of every sleep sent at once as a group (longest first). Results are
    not stored (``ignore_result``): the run is over when every task has recorded its times."""
    app, queue = cluster.runtime.app, queue_name(cluster.namespace, "default")
    client = redis.Redis.from_url(cluster.redis_url)

    def sleeps(pairs: Sequence[tuple[str, float]], times_key: str) -> list[Signature]:
        return [app.signature(SLEEP, args=(ms, times_key, name), immutable=True, queue=queue, ignore_result=True)
                for name, ms in pairs]

    longest_first = sorted(hetero.ms.items(), key=lambda pair: (-pair[1], pair[0]))
    spans = []
    for canvas, pairs in ((chain, hetero.critical_chain()), (group, longest_first)):
        times_key = f"{cluster.namespace}:rawtimes:{uuid.uuid4().hex}"
        canvas(*sleeps(pairs, times_key)).apply_async()
        deadline = time.monotonic() + timeout
        while client.hlen(times_key) < len(pairs):
            if time.monotonic() > deadline:
                raise bench.Timeout(f"{FLOOR}: {client.hlen(times_key)} of {len(pairs)} tasks after {timeout:.0f} s")
            time.sleep(0.02)
        spans.append(makespan(_recorded_times(cluster, times_key)))
    return spans[0], spans[1]


def _recorded_times(cluster: bench.BenchCluster, times_key: str) -> dict[str, tuple[float, float]]:
    """The (start, end) the raw sleep tasks stored under ``times_key`` (the key is deleted)."""
    client = redis.Redis.from_url(cluster.redis_url, decode_responses=True)
    stored = client.hgetall(times_key)
    client.delete(times_key)
    return {str(name): _start_end(value) for name, value in stored.items()}


def _start_end(text: str | bytes) -> tuple[float, float]:
    start, end = json.loads(text)
    return float(start), float(end)


def durations_ms(program: dict[str, Any]) -> dict[str, float]:
    """Nominal sleep of every module of a synthetic program."""
    return {name: float(module["inputs"].get("ms", 0.0)) for name, module in program["modules"].items()}


def level_tasks(plan: Plan, ms: dict[str, float]) -> list[list[tuple[str, float]]]:
    """The plan's dependency levels as (module, ms) pairs: what the raw canvas runs."""
    return [[(name, ms.get(name, 0.0)) for name in level] for level in plan.levels]


# --- 1. makespan / LB ---------------------------------------------------------------------------


@dataclass
class Hetero:
    """One heterogeneous program and its lower bound."""

    size: int
    program: dict[str, Any]
    plan: Plan
    ms: dict[str, float]

    @classmethod
    def make(cls, size: int) -> Hetero:
        program = synthetic.random_dag(size, seed=SEED, name=f"hetero{size}", durations_ms=DURATIONS_MS)
        return cls(size, program, Program.from_dict(program).plan(), durations_ms(program))

    def critical_chain(self) -> list[tuple[str, float]]:
        """The longest path by nominal duration, as (module, ms) from its start."""
        longest: dict[str, tuple[float, list[str]]] = {}
        for name in self.plan.topological_order():
            parents = [longest[parent] for parent in self.plan.modules[name].parents]
            total, path = max(parents, default=(0.0, []))
            longest[name] = (total + self.ms[name], [*path, name])
        return [(name, self.ms[name]) for name in max(longest.values())[1]]

    def critical_path_s(self) -> float:
        """Longest path by nominal duration."""
        return sum(ms for _, ms in self.critical_chain()) / 1000

    def work_s(self) -> float:
        return sum(self.ms.values()) / 1000

    def lower_bound_s(self) -> float:
        """LB = max(critical path, total work / slots)."""
        return max(self.critical_path_s(), self.work_s() / SLOTS)

    def describe(self) -> str:
        bound = "critical path" if self.critical_path_s() >= self.work_s() / SLOTS else "work / slots"
        return f"random_dag {self.size}, LB {self.lower_bound_s():.2f} s ({bound})"


@dataclass
class HeteroRecorder:
    """Makespans come back to ``interleaved``; walls, hop gaps and in-module overheads are kept on the side.

    Gaps and overheads: one value per run, the median over that run's modules (ms).
    """

    walls: dict[str, bench.Samples] = field(default_factory=dict)
    gaps: dict[str, list[float]] = field(default_factory=dict)
    overheads: dict[str, list[float]] = field(default_factory=dict)
    idle: dict[str, list[float]] = field(default_factory=dict)  # slot-seconds idle while modules were ready
    floors: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # (chain, group) makespans

    def keep(self, name: str, wall: float, gaps: list[float], overheads: list[float], idle: float) -> None:
        self.walls.setdefault(name, bench.Samples()).values.append(wall)
        self.gaps.setdefault(name, []).append(statistics.median(gaps))
        self.overheads.setdefault(name, []).append(statistics.median(overheads))
        self.idle.setdefault(name, []).append(idle)

    def median(self, values: dict[str, list[float]], name: str) -> float | None:
        return statistics.median(values[name]) if values.get(name) else None


def hetero_case(cluster: bench.BenchCluster, hetero: Hetero, strategy: str, recorder: HeteroRecorder,
                name: str, timeout: float, profiled: Runtime | None = None) -> float:
    """One run: returns the makespan from recorded start/end times; keeps the wall and hop gaps."""
    if strategy == FLOOR:
        spans = run_floor(cluster, hetero, timeout)
        recorder.floors.setdefault(name, []).append(spans)
        return max(spans)
    if strategy == RAW:
        wall, times = run_raw(cluster, level_tasks(hetero.plan, hetero.ms), timeout, record=True)
    else:
        wall, result = run_program(cluster, hetero.program, strategy.removesuffix(PROFILED), timeout,
                                   profiled if strategy.endswith(PROFILED) else None)
        times = module_times(result)
    if len(times) != hetero.size:
        raise RuntimeError(f"{name}: {len(times)} of {hetero.size} modules recorded times")
    overheads = [(end - start) * 1000 - hetero.ms[module] for module, (start, end) in times.items()]
    recorder.keep(name, wall, hop_gaps_ms(hetero.plan, times), overheads, idle_while_ready_s(hetero.plan, times))
    return makespan(times)


def idle_while_ready_s(plan: Plan, times: dict[str, tuple[float, float]]) -> float:
    """Slot-seconds during which a slot was free while a module was ready (all its parents ended, or the
    run started, and not started itself): what dispatch latency and slot turnover cost a busy cluster."""
    first = min(start for start, _ in times.values())
    events: list[tuple[float, int, int]] = []  # (time, change of busy slots, change of waiting modules)
    for name, (start, end) in times.items():
        ready = max((times[parent][1] for parent in plan.modules[name].parents), default=first)
        events += [(min(ready, start), 0, 1), (start, 1, -1), (end, -1, 0)]
    events.sort()
    idle, busy, waiting, previous = 0.0, 0, 0, first
    for moment, busy_change, waiting_change in events:
        idle += max(0, min(SLOTS - busy, waiting)) * (moment - previous)
        busy, waiting, previous = busy + busy_change, waiting + waiting_change, moment
    return idle


def hetero_cases(cluster: bench.BenchCluster, heteros: list[Hetero], recorder: HeteroRecorder,
                 profiled: Runtime) -> dict[str, Callable[[], float]]:
    cases: dict[str, Callable[[], float]] = {}
    for hetero in heteros:
        for strategy in HETERO_STRATEGIES:
            name = f"hetero/{hetero.size}/{strategy}"
            cases[name] = partial(hetero_case, cluster, hetero, strategy, recorder, name, HETERO_TIMEOUT_S, profiled)
    return cases


def learn_profiles(cluster: bench.BenchCluster, heteros: list[Hetero], runs: int) -> Runtime:
    """Record ``runs`` dag runs of each program with a real listener, ``optimize`` them (saving each
    profile), and return a client runtime that plans with those profiles."""
    url = f"sqlite:///{cluster.logdir / 'history.db'}"
    listener = bench.start_listener(cluster, url)
    try:
        for hetero in heteros:
            ids = [run_program(cluster, hetero.program, "dag")[1].execution_id for _ in range(runs)]
            bench.learn_profile(url, hetero.program["name"], ids)
    finally:
        listener.terminate()
        listener.wait(timeout=15)
    return create_runtime(cluster.settings.model_copy(update={"history_url": url}))


def hetero_rows(heteros: list[Hetero], samples: dict[str, bench.Samples], recorder: HeteroRecorder,
                meter: CpuMeter) -> list[Row]:
    rows = []
    for hetero in heteros:
        lb = hetero.lower_bound_s()
        raw = samples[f"hetero/{hetero.size}/{RAW}"].median
        for strategy in HETERO_STRATEGIES:
            name = f"hetero/{hetero.size}/{strategy}"
            span = samples[name]
            wall = recorder.walls.get(name, bench.Samples()).median
            ratios = [f"wall {bench.fmt(bench.ratio(wall, lb))} × LB"]
            row = Row("makespan / LB", hetero.describe(), strategy, cell(span, 1 / lb),
                      cpu=meter.per(name, hetero.size, "module"))
            if strategy == "levels":
                versus = bench.ratio(span.median, raw)
                ratios.insert(0, f"{bench.fmt(versus, 3)} × raw makespan")
                row.goal = f"≤ {LEVELS_VS_RAW_GOAL} × raw"
                row.verdict = f"{bench.fmt(versus, 3)}: {verdict(versus, LEVELS_VS_RAW_GOAL)}"
                if versus is not None and versus < 2 - LEVELS_VS_RAW_GOAL:
                    row.verdict += f" ({1 - versus:.0%} faster than raw)"
            if strategy.startswith("dag"):
                versus_lb = bench.ratio(span.median, lb)
                row.goal = f"≤ {DAG_GOAL} × LB"
                row.verdict = f"{bench.fmt(versus_lb)}: {verdict(versus_lb, DAG_GOAL)}"
                floor = samples[f"hetero/{hetero.size}/{FLOOR}"].median
                if floor is not None:
                    row.verdict += f" (Celery floor {floor / lb:.2f})"
                ratios.insert(0, f"{bench.fmt(bench.ratio(span.median, raw))} × raw makespan")
            if strategy == FLOOR:
                ratios = floor_ratios(hetero, recorder.floors.get(name, []))
            row.ratio = "; ".join(ratios)
            rows.append(row)
    return rows


def floor_ratios(hetero: Hetero, spans: list[tuple[float, float]]) -> list[str]:
    """The floor's two parts: chain makespan / critical path, group makespan / (work / slots)."""
    if not spans:
        return []
    chain_s = statistics.median(span[0] for span in spans)
    group_s = statistics.median(span[1] for span in spans)
    return [f"chain {chain_s / hetero.critical_path_s():.2f} × critical path",
            f"group {group_s / (hetero.work_s() / SLOTS):.2f} × work / slots"]


def verdict(value: float | None, limit: float) -> str:
    if value is None:
        return "no measurement"
    return "met" if value <= limit else "NOT met"


# --- 2. per-module overhead ---------------------------------------------------------------------


def overhead_cases(cluster: bench.BenchCluster, config: Config) -> dict[str, Callable[[], float]]:
    """One case per (shape, size, strategy); each returns wall seconds of one run."""
    cases: dict[str, Callable[[], float]] = {}
    for shape, sizes in config.shapes().items():
        for size, (depth, width) in sizes.items():
            program = synthetic.layered(depth, width, name=f"{shape}{size}")
            levels = level_tasks(Program.from_dict(program).plan(), {})
            for strategy in overhead_strategies(shape, size, config):
                cases[f"{shape}/{size}/{strategy}"] = (
                    partial(_raw_wall, cluster, levels, config.raw_timeout_s) if strategy == RAW
                    else partial(_program_wall, cluster, program, strategy))
    return cases


def overhead_strategies(shape: str, size: int, config: Config) -> tuple[str, ...]:
    """What runs on ``shape`` at ``size``: sequential is deep-only, and at the large size only if asked."""
    skip = size == config.large and not config.sequential_large
    return tuple(name for name in OVERHEAD_STRATEGIES[shape] if not (skip and name == "sequential"))


def _raw_wall(cluster: bench.BenchCluster, levels: list[list[tuple[str, float]]], timeout: float) -> float:
    return run_raw(cluster, levels, timeout, record=False)[0]


def _program_wall(cluster: bench.BenchCluster, program: dict[str, Any], strategy: str) -> float:
    return run_program(cluster, program, strategy)[0]


def overhead_rows(samples: dict[str, bench.Samples], config: Config, meter: CpuMeter) -> list[Row]:
    """Two rows (small, large) per shape and strategy: ms per module, × raw, flatness on the large row."""
    rows = []
    for shape, sizes in config.shapes().items():
        for strategy in OVERHEAD_STRATEGIES[shape]:
            per_size = {size: samples.get(f"{shape}/{size}/{strategy}", bench.Samples(failure="not run"))
                        for size in sizes}
            for size, (depth, width) in sizes.items():
                if strategy not in overhead_strategies(shape, size, config):
                    rows.append(Row("ms/module (no-op)", f"{shape} {depth}×{width} = {size}", strategy,
                                    "not run (20–40 s per run)", ratio="measured in Core engine (issue 2)"))
                    continue
                row = Row("ms/module (no-op)", f"{shape} {depth}×{width} = {size}", strategy,
                          per_module_cell(per_size[size], size, config.raw_timeout_s),
                          cpu=meter.per(f"{shape}/{size}/{strategy}", size, "module"))
                if strategy != RAW:
                    row.ratio = versus_raw(per_size[size], samples[f"{shape}/{size}/{RAW}"], config.raw_timeout_s)
                if size == config.large and strategy != RAW:
                    row.goal = f"flat ±{FLAT_GOAL:.0%} ({config.large}/{config.small})"
                    row.verdict = flat_verdict(flatness(per_size, config, statistics.median),
                                               flatness(per_size, config, min))
                rows.append(row)
    return rows


def per_module_cell(samples: bench.Samples, size: int, timeout_s: float) -> str:
    if samples.failure is not None and not samples.values:
        return f"> {timeout_s * 1000 / size:.1f} (timed out)" if "Timeout" in samples.failure else "failed"
    return cell(samples, 1000 / size)


def versus_raw(samples: bench.Samples, raw: bench.Samples, timeout_s: float) -> str:
    if raw.values:
        return f"{bench.fmt(bench.ratio(samples.median, raw.median))} × raw"
    if raw.failure and "Timeout" in raw.failure:
        return f"< {bench.fmt(bench.ratio(samples.median, timeout_s))} × raw"
    return ""


def flat_verdict(change: float | None, fastest: float | None) -> str:
    """The verdict on the ratio of medians; the ratio of the fastest (least disturbed) runs beside it."""
    if change is None or fastest is None:
        return "no measurement"
    text = f"{change:.2f} (fastest runs {fastest:.2f}): "
    if change < 1 - FLAT_GOAL:
        return text + "NOT met (cheaper per module when larger: fixed cost amortised, no growth)"
    return text + ("met" if change <= 1 + FLAT_GOAL else "NOT met (grows)")


def flatness(per_size: dict[int, bench.Samples], config: Config,
             summary: Callable[[list[float]], float]) -> float | None:
    """Per-module cost at the large size over the small size (``summary`` of each size's runs)."""
    small, large = per_size[config.small].values, per_size[config.large].values
    if not small or not large:
        return None
    return (summary(large) / config.large) / (summary(small) / config.small)


# --- 3. throughput ------------------------------------------------------------------------------


def three_module_program() -> dict[str, Any]:
    """a -> b -> c, each adding one to its input: c.value == x + 3 checks outputs are not crossed."""
    return {
        "name": "three",
        "inputs": ["x"],
        "modules": {
            "a": {"uses": synthetic.WORK, "inputs": {"x": "$inputs.x"}},
            "b": {"uses": synthetic.WORK, "inputs": {"p": "$a.value"}},
            "c": {"uses": synthetic.WORK, "inputs": {"p": "$b.value"}},
        },
        "outputs": {"value": "$c.value"},
    }


def run_many(cluster: bench.BenchCluster, strategy: str, count: int) -> float:
    """Submit ``count`` executions at once (from a small thread pool), wait for all: wall seconds."""
    program = Program.from_dict(three_module_program())
    app = cluster.runtime.app
    start = time.perf_counter()
    with ThreadPoolExecutor(SUBMIT_THREADS) as pool:
        handles = list(pool.map(
            lambda x: submit_program(program, {"x": x}, strategy=strategy, app=app, use_profile=False),
            range(count)))
    for x, handle in enumerate(handles):
        result = handle.get(timeout=RUN_TIMEOUT_S)
        if result.status is not ExecutionStatus.SUCCEEDED or result.outputs != {"value": x + 3}:
            raise RuntimeError(f"execution {x} ({strategy}): {result.status.value} {result.outputs} {result.error}")
    return time.perf_counter() - start


def run_many_raw(cluster: bench.BenchCluster, count: int) -> float:
    """``count`` raw chains of 3 no-op tasks sent at once: wall seconds to the last result."""
    app, queue = cluster.runtime.app, queue_name(cluster.namespace, "default")

    def send(_: int) -> Any:
        return chain(*[app.signature(NOOP, immutable=True, queue=queue) for _ in range(3)]).apply_async()

    start = time.perf_counter()
    with ThreadPoolExecutor(SUBMIT_THREADS) as pool:
        results = list(pool.map(send, range(count)))
    for result in results:
        result.get(timeout=RUN_TIMEOUT_S)
    return time.perf_counter() - start


def throughput_cases(cluster: bench.BenchCluster, config: Config) -> dict[str, Callable[[], float]]:
    cases: dict[str, Callable[[], float]] = {
        f"many/{strategy}": partial(run_many, cluster, strategy, config.executions)
        for strategy in ("levels", "sequential", "dag")}
    cases[f"many/{RAW}"] = partial(run_many_raw, cluster, config.executions)
    return cases


def throughput_rows(samples: dict[str, bench.Samples], config: Config, meter: CpuMeter) -> list[Row]:
    rows = []
    raw = samples[f"many/{RAW}"]
    for strategy in ("levels", "sequential", "dag", RAW):
        runs = samples[f"many/{strategy}"]
        rate = bench.Samples([config.executions / value for value in runs.values], runs.failure)
        row = Row("executions/s", f"{config.executions} × 3-module chain at once, 2 workers", strategy,
                  cell(rate, 1.0, digits=1), cpu=meter.per(f"many/{strategy}", config.executions, "execution"))
        if strategy != RAW and raw.median and runs.median:
            row.ratio = f"{raw.median / runs.median:.2f} × raw"
        rows.append(row)
    return rows


# --- 4. planner ---------------------------------------------------------------------------------


def compile_levels(data: dict[str, Any], app: Celery) -> list[Signature]:
    """Validate + plan + every ``levels`` stage signature (chord of module tasks + advance body)."""
    plan = Program.from_dict(data).plan()
    execution_id = uuid.uuid4().hex
    return [stage_signature(app, plan, execution_id, "levels", index, names, "bench")
            for index, names in enumerate(plan.levels)]


def compile_dag(data: dict[str, Any], app: Celery) -> list[Signature]:
    """Validate + plan + the task signature of every module (what ``dag`` sends over the execution)."""
    plan = Program.from_dict(data).plan()
    execution_id = uuid.uuid4().hex
    return [module_signature(app, plan, execution_id, name, "bench") for name in plan.modules]


def validate_plan(data: dict[str, Any]) -> Plan:
    return Program.from_dict(data).plan()


def planner_rows(config: Config) -> tuple[list[Row], str]:
    """Rows for plan and full compile of a dense DAG; and the case description."""
    data = synthetic.dense_dag(config.planner_size, seed=SEED)
    plan = validate_plan(data)
    edges = sum(len(module.parents) for module in plan.modules.values())
    case = f"dense_dag {config.planner_size} modules / {edges} edges"
    app = create_runtime(Settings(broker_url=None, namespace="bench")).app
    measures: list[tuple[str, str, Callable[[], object], float]] = [
        ("validate + plan ms", "any", partial(validate_plan, data), PLAN_GOAL_MS),
        ("full compile ms", "levels", partial(compile_levels, data, app), COMPILE_GOAL_MS),
        ("full compile ms", "dag", partial(compile_dag, data, app), COMPILE_GOAL_MS),
    ]
    rows = []
    for measure, strategy, function, goal in measures:
        samples = bench.time_calls(function, config.planner_repeats)
        median_ms = (samples.median or 0.0) * 1000
        bench.console.print(f"  {measure} {strategy}: {median_ms:.1f}", style="dim")
        rows.append(Row(measure, case, strategy, cell(samples, 1000.0, digits=1), goal=f"≤ {goal:g} ms",
                        verdict=f"{median_ms / goal:.1f}× the goal: " + verdict(median_ms, goal)))
    return rows, case


# --- table and docs -----------------------------------------------------------------------------


def cell(samples: bench.Samples, scale: float, digits: int = 2) -> str:
    """``median [min–max]`` of the samples times ``scale``."""
    if not samples.values:
        return "failed" if samples.failure else "—"
    values = [value * scale for value in samples.values]
    text = f"{statistics.median(values):.{digits}f}"
    if len(values) > 1:
        text += f" [{min(values):.{digits}f}–{max(values):.{digits}f}]"
    return text


def distribution_note(heteros: list[Hetero]) -> list[str]:
    """What the heavy-tailed durations look like, and which term of LB binds."""
    lines = []
    for hetero in heteros:
        values = sorted(hetero.ms.values())
        p90 = values[int(0.9 * (len(values) - 1))]
        capped = sum(value >= DURATIONS_MS[1] for value in values)
        lines.append(
            f"- random_dag {hetero.size} (seed {SEED}): {len(hetero.plan.levels)} levels, "
            f"durations median {statistics.median(values):.0f} ms, mean {statistics.mean(values):.0f} ms, "
            f"p90 {p90:.0f} ms, max {values[-1]:.0f} ms ({capped} at the {DURATIONS_MS[1]:.0f} ms cap); "
            f"critical path {hetero.critical_path_s():.2f} s over {len(hetero.critical_chain())} modules, "
            f"work / {SLOTS} slots {hetero.work_s() / SLOTS:.2f} s")
    return lines


def duration_priorities(hetero: Hetero) -> dict[str, float]:
    """Longest remaining path by nominal duration (what a learned profile approximates)."""
    remaining: dict[str, float] = {}
    for name in reversed(hetero.plan.topological_order()):
        children = hetero.plan.modules[name].children
        remaining[name] = hetero.ms[name] + max((remaining[child] for child in children), default=0.0)
    return remaining


def schedule_floor_note(heteros: list[Hetero]) -> str:
    cells = []
    for hetero in heteros:
        lb = hetero.lower_bound_s()
        children = {name: module.children for name, module in hetero.plan.modules.items()}
        by_count = bench.list_schedule_s(children, hetero.ms, {name: module.priority
                                                          for name, module in hetero.plan.modules.items()}, SLOTS)
        by_duration = bench.list_schedule_s(children, hetero.ms, duration_priorities(hetero), SLOTS)
        cells.append(f"{hetero.size} modules: by module count {by_count / lb:.3f} × LB, by duration "
                     f"{by_duration / lb:.3f} × LB")
    return ("- *scheduling floor*: makespan of the same greedy dispatch (a free slot takes the most urgent "
            f"ready module) with zero engine overhead on {SLOTS} slots, simulated from the nominal durations — "
            "what dag could reach with instant dispatch, for each priority: " + "; ".join(cells))


def gap_note(heteros: list[Hetero], recorder: HeteroRecorder) -> str:
    parts = []
    for hetero in heteros:
        cells = [f"{strategy} {gap:.0f} / {over:.1f}" for strategy in HETERO_STRATEGIES
                 if (gap := recorder.median(recorder.gaps, f"hetero/{hetero.size}/{strategy}")) is not None
                 and (over := recorder.median(recorder.overheads, f"hetero/{hetero.size}/{strategy}")) is not None]
        parts.append(f"{hetero.size} modules: " + ", ".join(cells))
    return ("- *gap / in-module overhead*, ms (median over runs of each run's median over modules): gap = a "
            "module's start minus its last parent's end (dispatch latency, plus waiting for a free slot and, "
            "with level barriers, for the slowest module of the level); in-module overhead = recorded duration "
            "minus the nominal sleep (dspex: record writes, hooks and input/output handling inside the record; "
            "raw: none): " + "; ".join(parts))


def dag_diagnosis(heteros: list[Hetero], samples: dict[str, bench.Samples], recorder: HeteroRecorder,
                  meter: CpuMeter) -> list[str]:
    """Where dag's time above LB goes, from the measured gap, overhead and worker CPU."""
    lines = []
    for hetero in heteros:
        name = f"hetero/{hetero.size}/dag"
        span, gap = samples[name].median, recorder.median(recorder.gaps, name)
        over, cpu = recorder.median(recorder.overheads, name), meter.seconds.get(name)
        if span is None or gap is None or over is None or not cpu:
            continue
        lb, excess_ms = hetero.lower_bound_s(), (span - hetero.lower_bound_s()) * 1000
        if hetero.critical_path_s() >= hetero.work_s() / SLOTS:
            hops = len(hetero.critical_chain())
            lines.append(
                f"- dag, {hetero.size} modules (LB = critical path, {hops} modules): makespan − LB = "
                f"{excess_ms:.0f} ms, {excess_ms / hops:.0f} ms per critical-path module ≈ its gap ({gap:.0f}) "
                f"+ in-module overhead ({over:.1f}): per-hop engine latency, not scheduling order, is what "
                f"separates it from LB. ≤ {DAG_GOAL} × LB needs ≤ "
                f"{(DAG_GOAL - 1) * lb * 1000 / hops:.0f} ms per hop here.")
        else:
            cpu_s = statistics.median(cpu)
            idle_s = recorder.median(recorder.idle, name) or 0.0
            lines.append(
                f"- dag, {hetero.size} modules (LB = work / {SLOTS} slots, {lb:.2f} s): the workers used "
                f"{cpu_s:.2f} CPU-s ({cpu_s * 1000 / hetero.size:.1f} ms per module) on a {os.cpu_count()}-core "
                f"machine shared with Redis and the client — ≥ {cpu_s / (os.cpu_count() or 1):.2f} s of the whole "
                f"machine, which LB (nominal sleeps only) leaves out; each module also holds its slot "
                f"{over:.1f} ms beyond its sleep, and ready modules wait for slots (median gap {gap:.0f} ms). "
                f"Slots stood free while a module was ready (its parents ended, it had not started) for "
                f"{idle_s:.2f} slot-s, {idle_s * 1000 / hetero.size:.1f} ms per module: the latency from a "
                f"parent's end, or a slot's last module's end, to the next start (count script, broker "
                f"round trips, Celery's ack, receive and pool hand-off) — {idle_s / SLOTS / lb * 100:.0f} % of LB.")
    return lines


def goal_lines(rows: list[Row]) -> list[str]:
    """One line per row that has a goal."""
    return [f"- {row.measure}, {row.case}, {row.strategy}: goal {row.goal} → {row.verdict}"
            for row in rows if row.goal and row.verdict]


def git_revision() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=bench.ROOT, capture_output=True,
                          text=True, check=False)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "dspex_celery"],
                           cwd=bench.ROOT, capture_output=True, text=True, check=False)
    return head.stdout.strip() + (" + uncommitted changes in dspex_celery/" if dirty.stdout.strip() else "")


def docs_body(table: str, notes: list[str], goals: list[str], config: Config, elapsed: float) -> str:
    return "\n".join([
        ("`.venv/bin/python scripts/bench_dag.py` — one invocation; within each part every case runs side by "
         f"side on the same two worker processes, in {config.rounds} interleaved rounds (order rotated each "
         f"round); planner cases {config.planner_repeats}× each after a warm-up. Cells: median [min–max]."),
        "",
        *bench.machine_lines(WORKERS),
        (f"- slots: {SLOTS} (2 workers × threads pool × concurrency 4); code: {git_revision()}; "
         f"whole run {elapsed:.0f} s"),
        "",
        table,
        "",
        "How to read it:",
        *notes,
        "",
        "Goals of issue 5:",
        *goals,
    ])


def static_notes(config: Config) -> list[str]:
    return [
        ("- *makespan / LB*: makespan = first module start → last module end, from the recorded start/finish "
         "times (dspex module records; the raw task records its own) — the ratio and the goals use it. "
         "*wall* = submit → result in the client (planning, dispatch and result publishing included). "
         f"LB = max(critical path by nominal duration, total work / {SLOTS} slots). Modules are "
         f"`synthetic.work` sleeping their ms (threads pool: sleeping costs no CPU); programs are "
         f"`synthetic.random_dag(n, seed={SEED}, durations_ms={DURATIONS_MS})` (Pareto α = 1.2 from 10 ms, "
         "capped at 300 ms). Priorities are the longest remaining path by module count (`use_profile=False`: "
         "no learned durations), except for *dag + learned profile*: before the rounds, a real `dspex-celery "
         f"listener` records {LEARNING_RUNS} dag runs of each program and `optimize` saves its profile; those "
         "runs are submitted with `use_profile=True`, so priorities are the longest remaining path by observed "
         "p50 duration (the issue's \"by observed duration when a history profile exists\"). *raw canvas*: `chain(chord(group(sleep.si(ms) per module of the level), "
         "noop.si()) per level)` of plain Celery tasks (`scripts/bench_dag_tasks.py`) on the same workers. "
         "*Celery floor*: no engine and no dependency tracking at all — the slower of two plain Celery canvases "
         "of the same sleep task on the same workers: a `chain` of the critical path's modules (what a hop "
         "costs bare Celery: result stored, next message published, received, started) and a `group` of "
         "every module at once, longest first (what the slots reach when nothing waits on anything). No "
         "engine that dispatches through Celery can beat it here, so it bounds what the dag goal can reach "
         "on this machine."),
        (f"- *ms/module (no-op)*: wall from `submit_program` to the result / module count; `synthetic.layered` "
         "(each module reads two of the level above), deep = 5 wide, wide = 10 levels. raw canvas: the same "
         "levels as a chain of chords of the no-op task of `scripts/bench_raw_tasks.py`; a run longer than "
         f"{config.raw_timeout_s:.0f} s is stopped (workers restarted, queues purged), not repeated, and shown "
         "as a lower bound. Goal: per-module cost flat within ±20 % (ratio of the medians, large/small; "
         "with other jobs on the CPUs the fastest run is the least disturbed one, so its ratio is given too)."),
        ("- *worker CPU*: user + system CPU seconds of the two worker processes during a run (`/proc/PID/stat`; "
         "median of the runs) per module or per execution — the engine's bookkeeping per module (records, "
         "outputs, hooks, strategy, Celery message handling) runs there. Sleeping costs none; the client's and "
         "Redis's CPU are not counted."),
        (f"- *executions/s*: {config.executions} executions of a → b → c (no-op, input x; each output checked "
         f"== x + 3, so none is crossed) submitted at once from {SUBMIT_THREADS} client threads "
         "(`submit_program` plans each one), then every result awaited; executions / (first submit → last "
         "result). raw canvas: the same count of `chain(noop.si() × 3)`."),
        ("- *planner*: `Program.from_dict(d).plan()` (schema, references, cycles, imports, levels, priorities, "
         "critical path); *full compile*: the same plus the Celery signatures — `levels`: every stage "
         "(`canvas.stage_signature`, chord + `advance` body); `dag`: `canvas.module_signature` of every module "
         "(built one by one on the workers as modules become ready). Measured in this process, not on a worker."),
    ]


# --- main ---------------------------------------------------------------------------------------


def warm_up(cluster: bench.BenchCluster) -> None:
    """Untimed small runs so every worker thread has imported and connected before timing."""
    small = synthetic.layered(4, 16)
    for strategy in ("levels", "sequential", "dag"):
        run_program(cluster, small, strategy)
    levels = level_tasks(Program.from_dict(small).plan(), {})
    run_raw(cluster, levels, RUN_TIMEOUT_S, record=False)
    run_raw(cluster, levels, RUN_TIMEOUT_S, record=True)
    run_many(cluster, "dag", 8)


def _restart(cluster: bench.BenchCluster, name: str, exc: BaseException) -> None:
    """After a timed-out case: fresh workers, empty queues."""
    cluster.restart()


def run_parts(config: Config, parts: Sequence[str]) -> tuple[list[Row], list[str]]:
    """The chosen parts; the rows (in table order) and the notes that depend on measurements."""
    planner: list[Row] = []
    if "planner" in parts:
        bench.console.rule("planner")
        planner, _ = planner_rows(config)
    rows: list[Row] = []
    notes: list[str] = []
    if set(parts) & set(CLUSTER_PARTS):
        rows, notes = cluster_parts(config, parts)
    return rows + planner, notes


def cluster_parts(config: Config, parts: Sequence[str]) -> tuple[list[Row], list[str]]:
    """The chosen parts that run on the workers, side by side on one cluster."""
    heteros = [Hetero.make(size) for size in config.hetero_sizes] if "hetero" in parts else []
    recorder = HeteroRecorder()
    rows: list[Row] = []
    notes: list[str] = []
    with bench.cluster(WORKERS) as cluster:
        warm_up(cluster)
        restart = partial(_restart, cluster)
        meter = CpuMeter(cluster)
        if heteros:
            bench.console.rule("makespan / LB")
            profiled = learn_profiles(cluster, heteros, LEARNING_RUNS)
            hetero = bench.interleaved(meter.wrap(hetero_cases(cluster, heteros, recorder, profiled)), config.rounds,
                                       on_failure=restart)
            rows += hetero_rows(heteros, hetero, recorder, meter)
            notes = [*distribution_note(heteros), schedule_floor_note(heteros), gap_note(heteros, recorder),
                     *dag_diagnosis(heteros, hetero, recorder, meter)]
        if "overhead" in parts:
            bench.console.rule("per-module overhead")
            overhead = bench.interleaved(meter.wrap(overhead_cases(cluster, config)), config.rounds,
                                         on_failure=restart)
            rows += overhead_rows(overhead, config, meter)
        if "throughput" in parts:
            bench.console.rule("throughput")
            many = bench.interleaved(meter.wrap(throughput_cases(cluster, config)), config.rounds,
                                     on_failure=restart)
            rows += throughput_rows(many, config, meter)
    return rows, notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run of about a minute; does not write the docs")
    parser.add_argument("--only", action="append", choices=PARTS, metavar="PART",
                        help=f"run only this part (repeatable; one of {', '.join(PARTS)}); does not write the docs")
    args = parser.parse_args()
    config = QUICK if args.quick else FULL
    started = time.perf_counter()
    rows, notes = run_parts(config, args.only or PARTS)
    elapsed = time.perf_counter() - started
    bench.print_table(f"{HEADING} — {elapsed:.0f} s", HEADERS, [row.cells() for row in rows])
    for line in [*notes, *goal_lines(rows)]:
        bench.console.print(line)
    if not args.quick and not args.only:
        table = bench.markdown_table(HEADERS, [row.cells() for row in rows])
        bench.write_section(HEADING, docs_body(table, [*static_notes(config), *notes], goal_lines(rows), config,
                                               elapsed))
        bench.console.print(f"written to {bench.BENCHMARKS_MD.relative_to(bench.ROOT)}")


if __name__ == "__main__":
    main()
