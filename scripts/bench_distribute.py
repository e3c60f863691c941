"""distribute(module): an unchanged imperative dspy.Module in-process vs its calls on workers.

    PYTHONPATH=. .venv/bin/python scripts/bench_distribute.py [--width 8] [--seconds 0.25] [--steps 10] [--rounds 3] [--write-docs]

One real worker (threads pool, concurrency 8). ``Fanout`` makes ``--width`` independent calls of
``--seconds`` each (tests/modules/dspy_imperative.py): in-process they run one after the other, as
written; distributed they overlap. ``Chain`` makes ``--steps`` calls that each wait for the one
before and take no time: what a distributed call costs (dispatch, store, worker, result) over an
in-process one. Cases interleaved per round; medians of the rounds.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

from benchlib import (
    BenchCluster,
    Samples,
    WorkerSpec,
    fmt,
    interleaved,
    machine_lines,
    markdown_table,
    print_table,
    ratio,
    write_section,
)

from dspex_celery import distribute
from dspex_celery.settings import Settings
from tests.modules.dspy_imperative import Chain, Fanout

HEADING = "distribute(module): an imperative dspy.Module in-process vs on workers (issue 16)"
WORKERS = [WorkerSpec(resources=("default",), concurrency=8, pool="threads")]


@dataclass
class DistributeBench(BenchCluster):
    """A bench cluster whose workers allow the test modules."""

    @property
    def settings(self) -> Settings:
        return super().settings.model_copy(update={"modules": "tests.modules"})


def timed(function: Callable[[], object]) -> Callable[[], float]:
    def case() -> float:
        start = time.perf_counter()
        function()
        return time.perf_counter() - start
    return case


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=8, help="independent calls of Fanout (default 8)")
    parser.add_argument("--seconds", type=float, default=0.25, help="seconds per Fanout call (default 0.25)")
    parser.add_argument("--steps", type=int, default=10, help="dependent zero-time calls of Chain (default 10)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--write-docs", action="store_true", help="write the section of docs/benchmarks.md")
    args = parser.parse_args()
    fan_options = {"width": args.width, "seconds": args.seconds}
    chain_options = {"steps": args.steps, "seconds": 0.0}
    bench = DistributeBench(WORKERS)
    try:
        bench.start()
        app = bench.runtime.app
        fan, chain = Fanout(**fan_options), Chain(**chain_options)
        remote_fan = distribute(Fanout(**fan_options), with_=fan_options, app=app)
        remote_chain = distribute(Chain(**chain_options), with_=chain_options, app=app)
        remote_chain(text="warm-up")  # the worker imports dspy and builds the module once
        samples = interleaved({
            "fanout in-process": timed(lambda: fan(text="q")),
            "fanout distributed": timed(lambda: remote_fan(text="q")),
            "chain in-process": timed(lambda: chain(text="q")),
            "chain distributed": timed(lambda: remote_chain(text="q")),
        }, args.rounds)
    finally:
        bench.stop()
    report(args, samples)


def report(args: argparse.Namespace, samples: dict[str, Samples]) -> None:
    def median(name: str) -> float | None:
        return samples[name].median

    fan_local, fan_remote = median("fanout in-process"), median("fanout distributed")
    chain_local, chain_remote = median("chain in-process"), median("chain distributed")
    per_call = None if chain_remote is None or chain_local is None else (chain_remote - chain_local) / args.steps
    headers = ["case", "calls", "median s", "vs in-process"]
    rows = [
        ["Fanout in-process (as written: one call after the other)", str(args.width + 1), fmt(fan_local, 3), "1.00×"],
        ["Fanout distributed (calls overlap on the worker)", str(args.width + 1), fmt(fan_remote, 3),
         f"{fmt(ratio(fan_local, fan_remote))}× faster"],
        ["Chain in-process (dependent, zero-time calls)", str(args.steps), fmt(chain_local, 3), "1.00×"],
        ["Chain distributed", str(args.steps), fmt(chain_remote, 3),
         f"+{fmt(None if per_call is None else per_call * 1000, 1)} ms per call"],
    ]
    print_table(HEADING, headers, rows)
    if args.write_docs:
        body = "\n".join([
            f"`scripts/bench_distribute.py --width {args.width} --seconds {args.seconds} --steps {args.steps} "
            f"--rounds {args.rounds}`: the same unchanged `dspy.Module` run in-process and through "
            f"`distribute(...)` on one threads worker (concurrency 8). `Fanout`: {args.width} independent calls of "
            f"{args.seconds} s each, then one more; `Chain`: {args.steps} calls that each wait for the one before "
            "and take no time, so its difference is the cost of a distributed call (dispatch, state store, worker, "
            "result back to the client). Cases interleaved, medians of the rounds; the machine was shared with "
            "other jobs (see the load), so the seconds are noisy.",
            "",
            markdown_table(headers, rows),
            "",
            *machine_lines(WORKERS),
        ])
        write_section(HEADING, body)


if __name__ == "__main__":
    main()
