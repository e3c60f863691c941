"""Core engine benchmark (issue 2): planner time, and per-module overhead beside a raw Celery canvas.

    .venv/bin/python scripts/bench_core.py [--quick]

Starts two `dspex-celery worker` subprocesses (resource class ``default``, threads pool, concurrency 4,
``--include bench_raw_tasks``) in a fresh namespace on real Redis, runs every case side by side in
interleaved rounds, prints one table and writes it to docs/benchmarks.md ("Core engine (issue 2)").
``--quick`` (a smoke run under a minute: smaller programs, one round) does not write the docs.
"""

from __future__ import annotations

import argparse
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import benchlib as bench
import redis
from bench_raw_tasks import NOOP
from celery import chain, chord, group
from celery.canvas import Signature

from dspex_celery import Program, Settings, create_runtime, submit_program
from dspex_celery.canvas import stage_signature
from dspex_celery.examples import synthetic
from dspex_celery.routing import queue_name

HEADING = "Core engine (issue 2)"
# threads: on this 2-core box a 300-module `levels` run took ~0.6-0.8x the wall time of prefork -c 4
WORKERS = [bench.WorkerSpec(("default",), concurrency=4, pool="threads", includes=("bench_raw_tasks",))] * 2
# `sequential` dispatches one module per stage whatever the shape: it is measured on `deep` only.
STRATEGIES = {"deep": ("levels", "sequential", "raw"), "wide": ("levels", "raw")}
RUN_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class Config:
    """Sizes, repeats and time budgets of one benchmark invocation."""

    small: int
    large: int
    planner_repeats: int
    rounds: int
    raw_timeout_s: float

    def shapes(self) -> dict[str, dict[int, tuple[int, int]]]:
        """(levels, width) per shape and size: deep = 5 wide, wide = 10 levels."""
        return {
            "deep": {size: (size // 5, 5) for size in (self.small, self.large)},
            "wide": {size: (10, size // 10) for size in (self.small, self.large)},
        }


FULL = Config(small=100, large=1000, planner_repeats=7, rounds=3, raw_timeout_s=30.0)
QUICK = Config(small=50, large=150, planner_repeats=3, rounds=1, raw_timeout_s=10.0)

GENERATORS: dict[str, Callable[[int], dict[str, Any]]] = {
    "random_dag": lambda n: synthetic.random_dag(n, seed=1),
    "layered 5 wide": lambda n: synthetic.layered(n // 5, 5),
    "dense_dag": lambda n: synthetic.dense_dag(n, seed=1),
}


# --- planner ----------------------------------------------------------------------------------


def plan_only(data: dict[str, Any]) -> None:
    """Validate + plan, as a client does before submitting."""
    Program.from_dict(data).plan()


def full_compile(data: dict[str, Any], app: Any) -> list[Signature]:
    """Validate + plan + the Celery signature of every ``levels`` stage (chord + advance body)."""
    plan = Program.from_dict(data).plan()
    execution_id = uuid.uuid4().hex
    return [stage_signature(app, plan, execution_id, "levels", index, names, "bench")
            for index, names in enumerate(plan.levels)]


def measure_planner(config: Config) -> list[list[str]]:
    """Rows: plan and full-compile milliseconds per generator, small and large."""
    app = create_runtime(Settings(broker_url=None, namespace="bench")).app
    rows: list[list[str]] = []
    measures: dict[str, Callable[[dict[str, Any]], object]] = {
        "plan ms": plan_only, "compile ms": partial(full_compile, app=app)}
    for measure, function in measures.items():
        for label, generator in GENERATORS.items():
            programs = {size: generator(size) for size in (config.small, config.large)}
            samples = {size: bench.time_calls(partial(function, program), config.planner_repeats)
                       for size, program in programs.items()}
            edges = sum(len(m.parents) for m in Program.from_dict(programs[config.large]).plan().modules.values())
            rows.append(scaling_row(measure, f"{label}, {edges / config.large:.1f} edges/module", samples, 1000.0))
            bench.console.print(f"  {measure} {label}: " + ", ".join(
                f"{size}: {bench.fmt(_median(s, 1000.0))}" for size, s in samples.items()), style="dim")
    return rows


# --- per-module overhead ----------------------------------------------------------------------


def raw_canvas(app: Any, queue: str, levels: int, width: int) -> Signature:
    """A hand-written chain of chords: per level, ``width`` no-op tasks and a no-op body."""

    def noop() -> Signature:
        return app.signature(NOOP, immutable=True, queue=queue)

    return chain(*[chord(group([noop() for _ in range(width)]), noop()) for _ in range(levels)])


def run_raw(cluster: bench.BenchCluster, levels: int, width: int, timeout: float) -> float:
    """Wall seconds of a raw canvas, from building it to the last chord body's result."""
    start = time.perf_counter()
    canvas = raw_canvas(cluster.runtime.app, queue_name(cluster.namespace, "default"), levels, width)
    canvas.apply_async().get(timeout=timeout)
    return time.perf_counter() - start


def overhead_cases(cluster: bench.BenchCluster, config: Config) -> dict[str, Callable[[], float]]:
    """One case per (shape, strategy, size); each returns wall seconds of one run.

    The small and large run of one strategy are neighbours in every round, so the load of other
    jobs, which drifts over minutes, weighs on both sides of their ratio alike.
    """
    cases: dict[str, Callable[[], float]] = {}
    for shape, sizes in config.shapes().items():
        for strategy in STRATEGIES[shape]:
            for size, (levels, width) in sizes.items():
                cases[f"{shape}/{size}/{strategy}"] = (
                    partial(run_raw, cluster, levels, width, config.raw_timeout_s) if strategy == "raw"
                    else partial(cluster.run, synthetic.layered(levels, width, name=f"{shape}{size}"), strategy,
                                 RUN_TIMEOUT_S))
    return cases


def warm_up(cluster: bench.BenchCluster) -> None:
    """Untimed small runs, so every pool process has imported and connected before timing."""
    for strategy in ("levels", "sequential"):
        cluster.run(synthetic.layered(4, 16), strategy, RUN_TIMEOUT_S)
    run_raw(cluster, 4, 16, RUN_TIMEOUT_S)


def overhead_rows(samples: dict[str, bench.Samples], config: Config) -> list[list[str]]:
    """Rows: ms per module for each shape and strategy, with ratios to the raw canvas."""
    rows = []
    for shape, sizes in config.shapes().items():
        dims = " → ".join(f"{levels}×{width}" for levels, width in sizes.values())
        for strategy in STRATEGIES[shape]:
            timeout = config.raw_timeout_s if strategy == "raw" else RUN_TIMEOUT_S
            per_module = {size: per_module_samples(samples[f"{shape}/{size}/{strategy}"], size, timeout)
                          for size in sizes}
            raw = {size: samples[f"{shape}/{size}/raw"] for size in sizes}
            label = "raw canvas" if strategy == "raw" else strategy
            row = scaling_row(f"ms/module {label}", f"{shape} {dims}", per_module, 1.0)
            if strategy != "raw":
                row += [versus_raw(samples[f"{shape}/{size}/{strategy}"], raw[size], config.raw_timeout_s)
                        for size in sizes]
            rows.append(row)
    return rows


def versus_raw(strategy: bench.Samples, raw: bench.Samples, raw_timeout_s: float) -> str:
    """Strategy median / raw median; an upper bound (``< x``) when a raw run timed out."""
    if raw.failure is None:
        return bench.fmt(bench.ratio(strategy.median, raw.median))
    raw_at_least = max(raw.median or 0.0, raw_timeout_s) if not raw.values else raw.median
    return "< " + bench.fmt(bench.ratio(strategy.median, raw_at_least))


def per_module_samples(samples: bench.Samples, size: int, timeout_s: float) -> bench.Samples:
    """Seconds per run → milliseconds per module; a timed-out case shows its lower bound."""
    scaled = bench.Samples([value * 1000 / size for value in samples.values], samples.failure)
    if samples.failure and "Timeout" in samples.failure:
        scaled.failure = f"> {bench.fmt(timeout_s * 1000 / size, 1)} (timeout)"
    return scaled


# --- message size -----------------------------------------------------------------------------


def largest_message(redis_url: str, send: Callable[[str], None]) -> int:
    """Bytes of the largest message ``send(namespace)`` puts on queues nobody consumes."""
    namespace = f"probe{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(redis_url)
    try:
        send(namespace)
        keys = [key for key in client.scan_iter(match=f"{namespace}.*") if client.type(key) == b"list"]
        return max((len(message) for key in keys for message in client.lrange(key, 0, -1)), default=0)
    finally:
        bench.purge_namespace(client, namespace)


def message_rows(config: Config) -> list[list[str]]:
    """Rows: the largest first-dispatch message of ``levels`` and of the raw canvas, per shape."""
    rows = []
    for shape, sizes in config.shapes().items():
        dims = " → ".join(f"{levels}×{width}" for levels, width in sizes.values())
        for strategy in ("levels", "raw"):
            values = {}
            for size, (levels, width) in sizes.items():
                send = partial(send_first, strategy=strategy, levels=levels, width=width)
                values[size] = bench.Samples([float(largest_message(bench.REDIS_URL, send))])
            label = "raw canvas" if strategy == "raw" else strategy
            rows.append(scaling_row(f"max message bytes, {label}", f"{shape} {dims}", values, 1.0, digits=0))
    return rows


def send_first(namespace: str, strategy: str, levels: int, width: int) -> None:
    """Dispatch a program's first stage (or the raw canvas's first chord) with no worker listening."""
    runtime = create_runtime(Settings(broker_url=bench.REDIS_URL, namespace=namespace,
                                      modules=bench.BENCH_MODULES, state_ttl_s=60))
    if strategy == "raw":
        raw_canvas(runtime.app, queue_name(namespace, "default"), levels, width).apply_async()
    else:
        submit_program(synthetic.layered(levels, width), {}, strategy=strategy, app=runtime.app)


# --- table ------------------------------------------------------------------------------------


def scaling_row(measure: str, shape: str, samples: dict[int, bench.Samples], scale: float,
                digits: int = 2) -> list[str]:
    """``measure, shape, small, large, large/small`` with medians [min–max] times ``scale``."""
    small, large = samples.values()
    change = bench.fmt(bench.ratio(_median(large, scale), _median(small, scale)))
    if large.failure is not None and large.values:
        change = "> " + change  # the runs that failed would have taken longer
    return [measure, shape, cell(small, scale, digits), cell(large, scale, digits), change]


def cell(samples: bench.Samples, scale: float, digits: int) -> str:
    if samples.failure is not None and not samples.values:
        return samples.failure if samples.failure.startswith(">") else "failed"
    values = [value * scale for value in samples.values]
    text = bench.fmt(_median(samples, scale), digits)
    if len(values) > 1:
        text += f" [{bench.fmt(min(values), digits)}–{bench.fmt(max(values), digits)}]"
    if samples.failure is not None:  # some runs finished, then one timed out or failed
        text += f", {len(values)} run{'s' if len(values) > 1 else ''}; next: {samples.failure}"
    return text


def _median(samples: bench.Samples, scale: float) -> float | None:
    return None if samples.median is None else samples.median * scale


def headers(config: Config) -> list[str]:
    return ["measure", "shape / program", f"{config.small} modules", f"{config.large} modules",
            f"{config.large}/{config.small}", f"× raw @{config.small}", f"× raw @{config.large}"]


def verdicts(samples: dict[str, bench.Samples], config: Config) -> list[str]:
    """One line per dspex strategy and shape: is per-module cost flat (±20 %) from small to large?

    Also splits the medians into a fixed per-execution cost and a marginal per-module cost
    (the line through the two sizes), which tells growth apart from amortised start-up cost.
    """
    lines = []
    for shape in config.shapes():
        for strategy in (name for name in STRATEGIES[shape] if name != "raw"):
            small_samples, large_samples = (samples[f"{shape}/{size}/{strategy}"] for size in (config.small, config.large))
            small, large = small_samples.median, large_samples.median
            if small is None or large is None:
                lines.append(f"- {strategy}, {shape}: no measurement")
                continue
            change = (large / config.large) / (small / config.small)
            fastest = (min(large_samples.values) / config.large) / (min(small_samples.values) / config.small)
            marginal = (large - small) / (config.large - config.small)
            fixed = small - marginal * config.small
            lines.append(f"- {strategy}, {shape}: {config.large}/{config.small} per-module ratio of medians "
                         f"{change:.2f} — {_verdict(change)} (ratio of fastest runs {fastest:.2f}); line through "
                         f"the medians: {fixed * 1000:.0f} ms per execution + {marginal * 1000:.2f} ms per module")
    return lines


def _verdict(change: float) -> str:
    if change > 1.2:
        return "NOT flat: per-module cost grows by more than 20 %"
    if change < 0.8:
        return "NOT within ±20 %: cheaper per module at the larger size (no growth)"
    return "flat (within ±20 %)"


def git_revision() -> str:
    """HEAD and whether the working tree had uncommitted changes (other engineers' work in progress)."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=bench.ROOT, capture_output=True,
                          text=True, check=False)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=bench.ROOT,
                           capture_output=True, text=True, check=False)
    return head.stdout.strip() + (" + uncommitted changes in the working tree" if dirty.stdout.strip() else "")


def docs_body(table: str, samples: dict[str, bench.Samples], config: Config, elapsed: float) -> str:
    return "\n".join([
        ("`.venv/bin/python scripts/bench_core.py` — one invocation, every case side by side on the same two "
         f"worker processes; overhead cases run in {config.rounds} interleaved rounds (order rotated each "
         f"round), planner cases {config.planner_repeats}× each after a warm-up. Cells: median [min–max]."),
        "",
        *bench.machine_lines(WORKERS),
        f"- code: {git_revision()}; whole run {elapsed:.0f} s",
        "",
        table,
        "",
        "How to read it:",
        ("- *plan ms*: `Program.from_dict(d).plan()` (schema, references, cycles, imports, levels, "
         "priorities, critical path). *compile ms*: the same plus the Celery signature of every `levels` "
         "stage (`canvas.stage_signature`: chord of module tasks + `advance` body)."),
        ("- *ms/module*: wall time from `submit_program` (planning included) to the result, divided by the "
         "module count; modules are `synthetic.work` with `ms=0` (no-op), programs are `synthetic.layered` "
         "(each module reads two of the level above). *raw canvas*: a hand-written chain of chords, "
         "`chain(chord(group(noop.si() × width), noop.si()) × levels)` of a plain `@shared_task` "
         "(`scripts/bench_raw_tasks.py`, loaded with `dspex-celery worker --include`), run on the same "
         f"workers; a run longer than "
         f"{config.raw_timeout_s:.0f} s is stopped (workers restarted, queues purged), not repeated, and shown "
         "as a lower bound (`--raw-timeout 300` measures it to the end, at the cost of a much longer run). "
         "`sequential` is measured on `deep` only: it dispatches one module per stage whatever the shape."),
        ("- *× raw*: strategy wall / raw-canvas wall at the same size (< 1 = faster than raw; `< x` when the "
         "raw run timed out)."),
        ("- *max message bytes*: the biggest message on the broker right after the first dispatch (no worker "
         "listening). dspex messages carry only `(execution_id, module)`; Celery's chain-of-chords carries the "
         "rest of the chain in every header message (Celery #5000, #9202, #5286), which is why its per-module "
         "cost grows with the program."),
        "",
        (f"Goal of issue 2 — per-module cost flat within ±20 % from {config.small} to {config.large} modules "
         "(medians of interleaved runs; with other jobs loading the CPUs the fastest run is the least "
         "disturbed one, so its ratio is given too):"),
        *verdicts(samples, config),
    ])


# --- main -------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run under a minute; does not write the docs")
    parser.add_argument("--raw-timeout", type=float, default=None, help="seconds before a raw canvas run is stopped")
    args = parser.parse_args()
    config = QUICK if args.quick else FULL
    if args.raw_timeout:
        config = Config(**{**config.__dict__, "raw_timeout_s": args.raw_timeout})
    started = time.perf_counter()

    bench.console.rule("planner")
    rows = measure_planner(config)
    bench.console.rule("message size")
    rows += message_rows(config)
    bench.console.rule("per-module overhead")
    with bench.cluster(WORKERS) as cluster:
        warm_up(cluster)
        samples = bench.interleaved(overhead_cases(cluster, config), config.rounds,
                                    on_failure=lambda name, exc: cluster.restart())
    rows += overhead_rows(samples, config)

    rows = [row + [""] * (len(headers(config)) - len(row)) for row in rows]
    elapsed = time.perf_counter() - started
    bench.print_table(f"{HEADING} — {elapsed:.0f} s", headers(config), rows)
    for line in verdicts(samples, config):
        bench.console.print(line)
    if not args.quick:
        bench.write_section(HEADING, docs_body(bench.markdown_table(headers(config), rows), samples, config, elapsed))
        bench.console.print(f"written to {bench.BENCHMARKS_MD.relative_to(bench.ROOT)}")


if __name__ == "__main__":
    main()
