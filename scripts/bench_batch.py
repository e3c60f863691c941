"""Batch throughput: the DSPy RAG example over a dataset, lines per second by --max-in-flight.

    .venv/bin/python scripts/bench_batch.py [--lines 200] [--rounds 3] [--write-docs]

Starts two real workers (prefork, concurrency 4, resources default+io+llm) in a fresh namespace
on Redis, warms them up (each pool process imports dspy once), then runs ``submit_batch`` over
``--lines`` questions of ``examples/dspy_rag.yaml`` (Retrieve -> ChainOfThought on the offline
DummyLM) for each in-flight bound, rounds interleaved; reports the median lines/s.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from benchlib import (
    ROOT,
    WorkerSpec,
    cluster,
    fmt,
    interleaved,
    machine_lines,
    markdown_table,
    print_table,
    write_section,
)

from dspex_celery import Program, submit_batch
from dspex_celery.examples.dspy_rag import OFFLINE_ANSWERS

HEADING = "Batch runs over datasets (issue 7)"
WORKERS = [WorkerSpec(resources=("default", "io", "llm"), concurrency=4, pool="prefork")] * 2
QUESTIONS = [f"What is {topic}?" for topic in OFFLINE_ANSWERS] + ["How do I bake bread?"]


def dataset(count: int) -> list[dict[str, str]]:
    """Distinct questions (a line number in each), cycling over the example's topics."""
    return [{"question": f"{QUESTIONS[index % len(QUESTIONS)]} (line {index})"} for index in range(count)]


def batch_case(bench: object, program: Program, lines: int, max_in_flight: int) -> Callable[[], float]:
    """A case returning lines per second of one whole batch (raises if a line failed)."""

    def run() -> float:
        start = time.perf_counter()
        result = submit_batch(program, dataset(lines), app=bench.runtime.app,  # type: ignore[attr-defined]
                              max_in_flight=max_in_flight).get()
        wall = time.perf_counter() - start
        if result.count("succeeded") != lines:
            raise RuntimeError(f"{lines - result.count('succeeded')} lines did not succeed")
        return lines / wall

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=200, help="lines per batch (default 200)")
    parser.add_argument("--baseline-lines", type=int, default=50, help="lines of the 1-in-flight case")
    parser.add_argument("--in-flight", type=int, nargs="+", default=[8, 32], help="max in flight values")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per case (median reported)")
    parser.add_argument("--write-docs", action="store_true", help=f"write the '{HEADING}' section")
    args = parser.parse_args()
    program = Program.from_file(ROOT / "examples" / "dspy_rag.yaml")
    started = time.monotonic()
    with cluster(WORKERS) as bench:
        submit_batch(program, dataset(32), app=bench.runtime.app, max_in_flight=16).get()  # warm-up
        cases = {"1 (one line at a time)": batch_case(bench, program, args.baseline_lines, 1)}
        cases |= {str(bound): batch_case(bench, program, args.lines, bound) for bound in args.in_flight}
        samples = interleaved(cases, args.rounds)
    elapsed = time.monotonic() - started
    headers = ["--max-in-flight", "lines", "runs", "lines/s median", "min", "max"]
    rows = [
        [name, str(args.baseline_lines if name.startswith("1 ") else args.lines), str(len(sample.values)),
         fmt(sample.median, 1), fmt(min(sample.values, default=None), 1), fmt(max(sample.values, default=None), 1)]
        for name, sample in samples.items()
    ]
    print_table("batch throughput", headers, rows)
    if args.write_docs:
        intro = (
            "`.venv/bin/python scripts/bench_batch.py --write-docs` — `submit_batch` over the "
            "`examples/dspy_rag.yaml` program (Retrieve → ChainOfThought on the offline DummyLM; two "
            "modules, so two module tasks per line), one execution per line, distinct questions; "
            f"rounds interleaved, median of {args.rounds}. A batch's wall time includes every line's "
            "submission (plan stored, canvas sent; 4 submitting threads), both module tasks and the result "
            "read (one MGET of the in-flight results every 20 ms). Client, Redis and the 8 worker processes "
            "share the machine's 2 cores with other jobs, so more in flight stops helping once they are busy."
        )
        body = "\n".join([
            intro,
            "",
            *machine_lines(WORKERS),
            f"- whole run {elapsed:.0f} s",
            "",
            markdown_table(headers, rows),
        ])
        write_section(HEADING, body)


if __name__ == "__main__":
    main()
