"""The shared LM cache: a batch run a second time (every request cached) vs its first run.

    PYTHONPATH=. .venv/bin/python scripts/bench_lm_cache.py [--lines 48] [--rounds 3] [--latency 0.5] [--write-docs]

Two real workers (threads pool, concurrency 8 each) with ``DSPEX_LM_CACHE=redis`` run
``submit_batch`` over ``--lines`` lines of a two-module DSPy program (two distinct LM requests per
line) against the counting LM of tests/modules/lm_usage_mods.py (``--latency`` s per call, no
network; it counts the calls it really gets). Each round runs a batch of new questions (cold
cache), then the same batch again; medians of the rounds, the ratio, and the LM calls of each run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid
from dataclasses import dataclass

from benchlib import (
    REDIS_URL,
    BenchCluster,
    WorkerSpec,
    fmt,
    machine_lines,
    markdown_table,
    print_table,
    ratio,
    write_section,
)

from dspex_celery import Program, submit_batch
from dspex_celery.settings import Settings
from tests.modules.lm_usage_mods import COUNTER_ENV, LATENCY_ENV, answer_program

HEADING = "Shared LM cache: cached second run vs first (issue 17)"
WORKERS = [WorkerSpec(resources=("default",), concurrency=8, pool="threads")] * 2


@dataclass
class CacheBench(BenchCluster):
    """A bench cluster whose workers allow the test modules and share the LM cache."""

    @property
    def settings(self) -> Settings:
        return super().settings.model_copy(update={"modules": "tests.modules"})


@dataclass
class Run:
    seconds: float
    lm_calls: int
    hits: int


def run_batch(bench: CacheBench, program: Program, tag: str, lines: int) -> Run:
    """One batch of ``lines`` lines asking about ``tag``; its seconds and the LM calls it caused."""
    counter = bench.runtime.store.client
    key = counter_key(bench)
    before = int(counter.hget(key, "calls") or 0)
    items = [{"question": f"{tag} question {i}", "again": f"{tag} again {i}"} for i in range(lines)]
    start = time.perf_counter()
    result = submit_batch(program, items, app=bench.runtime.app, max_in_flight=32).get()
    seconds = time.perf_counter() - start
    if result.count("succeeded") != lines:
        raise RuntimeError(f"{lines - result.count('succeeded')} lines did not succeed")
    return Run(seconds, int(counter.hget(key, "calls") or 0) - before, result.usage.cache_hits)


def counter_key(bench: CacheBench) -> str:
    return f"{bench.namespace}:lm-counter"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=48, help="lines per batch (default 48)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--latency", type=float, default=0.5, help="seconds per LM call (default 0.5, a short remote LM call)")
    parser.add_argument("--write-docs", action="store_true", help="write the section of docs/benchmarks.md")
    args = parser.parse_args()

    bench = CacheBench(WORKERS)
    bench.cluster.extra_env.update({"DSPEX_LM_CACHE": "redis", COUNTER_ENV: counter_key(bench),
                                    LATENCY_ENV: str(args.latency), "DSPEX_TEST_REDIS_URL": REDIS_URL})
    os.environ["DSPEX_TEST_REDIS_URL"] = REDIS_URL
    program = Program.from_dict(answer_program("bench_lm_cache"))
    first: list[Run] = []
    second: list[Run] = []
    try:
        bench.start()
        run_batch(bench, program, f"warmup-{uuid.uuid4().hex[:6]}", 16)  # each worker imports dspy once
        for round_ in range(args.rounds):
            tag = uuid.uuid4().hex[:8]
            first.append(run_batch(bench, program, tag, args.lines))
            second.append(run_batch(bench, program, tag, args.lines))
            print(f"round {round_ + 1}: first {first[-1].seconds:.2f} s ({first[-1].lm_calls} LM calls), "
                  f"second {second[-1].seconds:.2f} s ({second[-1].lm_calls} LM calls)")
    finally:
        bench.stop()
    report(args, first, second)


def report(args: argparse.Namespace, first: list[Run], second: list[Run]) -> None:
    cold = statistics.median(run.seconds for run in first)
    warm = statistics.median(run.seconds for run in second)
    headers = ["case", "runs", "median s", "lines/s", "LM calls per run", "cache hits per run", "vs first"]
    rows = [
        ["first run (new requests)", str(len(first)), fmt(cold), fmt(args.lines / cold, 1),
         str(max(run.lm_calls for run in first)), str(max(run.hits for run in first)), "1.00×"],
        ["second run (same batch, cached)", str(len(second)), fmt(warm), fmt(args.lines / warm, 1),
         str(max(run.lm_calls for run in second)), str(min(run.hits for run in second)),
         f"{fmt(ratio(cold, warm))}× faster"],
    ]
    print_table(HEADING, headers, rows)
    if args.write_docs:
        body = "\n".join([
            f"`scripts/bench_lm_cache.py --lines {args.lines} --rounds {args.rounds} --latency {args.latency}`: "
            f"a batch of {args.lines} lines of a two-module DSPy program (two distinct LM requests per line, "
            f"{args.latency * 1000:.0f} ms per LM call, `max_in_flight` 32), run once with new questions and then "
            "again with the same ones, on workers with `DSPEX_LM_CACHE=redis`. LM calls are counted by the fake LM "
            "itself. Medians of the rounds; the machine was shared with other jobs, so the seconds are noisy "
            "(the call counts are not).",
            "",
            markdown_table(headers, rows),
            "",
            *machine_lines(WORKERS),
        ])
        write_section(HEADING, body)


if __name__ == "__main__":
    main()
