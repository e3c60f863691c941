"""429-adaptive limits vs fixed limits against an LM that answers 429 above N concurrent calls.

    .venv/bin/python scripts/bench_rate_limits.py [--lines 80] [--lm-limit 4] [--rounds 3] [--write-docs]

Two thread-pool workers of 8 slots serve three resource classes, each with its own copy of the same
fake LM (``--latency`` 0.3 s per call, HTTP 429 with Retry-After 0.5 s above ``--lm-limit`` calls
at once): ``adaptive`` (max_concurrent 16, halved on a 429, +1 per 2 s quiet; its adaptive state
is cleared before every round, so each starts cold at 16), ``fixed`` (max_concurrent 16,
``adaptive: false``: the retries with their Retry-After are all there is) and ``fixed at N``
(max_concurrent = the LM's limit: the oracle that knows it). Two LMs: ``concurrency`` (a 429 costs
nothing but its retry) and ``lockout`` (a 429 also refuses every call for the Retry-After, as an
exhausted provider window does). A batch of ``--lines`` one-module lines runs on each class per
LM, rounds interleaved; reported: median completion time and 429s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import redis
from benchlib import (
    BENCH_MODULES,
    REDIS_URL,
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

from dspex_celery import Program, submit_batch
from dspex_celery.resources import adaptive_key
from dspex_celery.settings import Settings

HEADING = "429-adaptive limits vs fixed limits (issue 17)"
CLASSES = ("adaptive", "fixed", "fixed_at_n")
#: The fake LMs: seconds a 429 locks every caller out (0: none).
LOCKOUTS = {"concurrency": 0.0, "lockout": 0.5}
WORKERS = [WorkerSpec(resources=CLASSES, concurrency=8, pool="threads")] * 2
LM = "bench_rate_limit_lm:answer"
RETRY = {"max_attempts": 30, "backoff_s": 0.1, "max_backoff_s": 2.0}


@dataclass
class RateLimitBench(BenchCluster):
    """The bench cluster, its LM module allow-listed and the three classes' limits configured."""

    lm_limit: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        self.cluster.extra_env["DSPEX_RESOURCES"] = json.dumps(self.limits)  # the workers' limits

    @property
    def limits(self) -> dict[str, dict[str, object]]:
        return {"adaptive": {"max_concurrent": 16, "recover_every_s": 2},
                "fixed": {"max_concurrent": 16, "adaptive": False},
                "fixed_at_n": {"max_concurrent": self.lm_limit, "adaptive": False}}

    @property
    def settings(self) -> Settings:
        return Settings(broker_url=self.redis_url, namespace=self.namespace, state_ttl_s=900,
                        modules=f"{BENCH_MODULES},bench_rate_limit_lm", resources=self.limits)


def lm_program(resource: str, key: str, lm_limit: int, latency_s: float, lockout_s: float) -> Program:
    inputs = {"question": "$inputs.question", "key": key, "redis_url": REDIS_URL, "limit": lm_limit,
              "latency_s": latency_s, "lockout_s": lockout_s}
    return Program.from_dict({"name": f"rl_{resource}", "inputs": ["question"], "modules": {
        "answer": {"uses": LM, "inputs": inputs, "resource": resource, "retry": RETRY}}})


def case(bench: RateLimitBench, resource: str, lines: int, latency_s: float, lockout_s: float,
         rate_limited: list[int]) -> Callable[[], float]:
    """One batch on ``resource``: its wall seconds; the LM's 429s are appended to ``rate_limited``."""
    client = redis.Redis.from_url(REDIS_URL)

    def run() -> float:
        client.delete(adaptive_key(bench.runtime.store, resource))  # every round starts cold
        key = f"bench-rl-{uuid.uuid4().hex}"
        program = lm_program(resource, key, bench.lm_limit, latency_s, lockout_s)
        start = time.perf_counter()
        result = submit_batch(program, [{"question": f"q{i}"} for i in range(lines)], app=bench.runtime.app,
                              max_in_flight=32).get()
        wall = time.perf_counter() - start
        rate_limited.append(int(client.get(f"{key}:429") or 0))
        client.delete(f"{key}:429", f"{key}:in_flight", f"{key}:locked")
        if result.count("succeeded") != lines:
            first = next(line.error for line in result.lines if line.status != "succeeded")
            raise RuntimeError(f"{lines - result.count('succeeded')} lines did not succeed, e.g. {first}")
        return wall

    return run


def median_of(values: list[int]) -> float | None:
    return statistics.median(values) if values else None


def reading(lm: str, samples: dict[str, Samples], counts: dict[str, list[int]]) -> str:
    """One sentence per LM: adaptive's 429s and time against the fixed limit of 16."""
    adaptive, fixed = f"{lm} / adaptive", f"{lm} / fixed"
    fewer = ratio(median_of(counts[fixed]), median_of(counts[adaptive]))
    said = f"- `{lm}` LM: adaptive limits answered {fmt(fewer, 1)}× fewer 429s than the fixed limit of 16"
    if samples[fixed].failure is not None:
        return f"{said}, which did not complete ({samples[fixed].failure})."
    return f"{said} and took {fmt(ratio(samples[adaptive].median, samples[fixed].median))}× its time."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=80, help="lines per batch (default 80)")
    parser.add_argument("--lm-limit", type=int, default=4, help="concurrent calls the LM allows (default 4)")
    parser.add_argument("--latency", type=float, default=0.3, help="seconds per LM call (default 0.3)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per case (median reported)")
    parser.add_argument("--write-docs", action="store_true", help=f"write the '{HEADING}' section")
    args = parser.parse_args()
    started = time.monotonic()
    bench = RateLimitBench(WORKERS, lm_limit=args.lm_limit)
    names = [f"{lm} / {resource}" for lm in LOCKOUTS for resource in CLASSES]
    counts: dict[str, list[int]] = {name: [] for name in names}
    try:
        bench.start()
        cases = {name: case(bench, name.split(" / ")[1], args.lines, args.latency,
                            LOCKOUTS[name.split(" / ")[0]], counts[name]) for name in names}
        samples = interleaved(cases, args.rounds)
    finally:
        bench.stop()
    elapsed = time.monotonic() - started
    ideal = args.lines * args.latency / args.lm_limit
    headers = ["LM", "limit", "setting", "runs", "completion s (median)", "429s (median)", "vs fixed 16", "vs ideal"]
    settings = {"adaptive": "max_concurrent 16, adaptive (halve, +1 per 2 s)",
                "fixed": "max_concurrent 16, adaptive: false",
                "fixed_at_n": f"max_concurrent {args.lm_limit}, adaptive: false"}
    rows = []
    for name, sample in samples.items():
        lm, resource = name.split(" / ")
        completion = "lines failed" if sample.failure is not None else fmt(sample.median)
        rows.append([lm, resource, settings[resource], str(len(sample.values)), completion,
                     fmt(median_of(counts[name]), 0), fmt(ratio(sample.median, samples[f"{lm} / fixed"].median)) + "×",
                     fmt(ratio(sample.median, ideal)) + "×"])
    print_table("429-adaptive limits", headers, rows)
    if args.write_docs:
        intro = (
            "`.venv/bin/python scripts/bench_rate_limits.py --write-docs` — a batch of "
            f"{args.lines} one-module lines (`submit_batch`, 32 in flight) against a fake LM that takes "
            f"{args.latency:g} s per call and answers HTTP 429 (Retry-After 0.5 s) above {args.lm_limit} concurrent "
            "calls; `lockout`: a 429 also refuses every call for 0.5 s (an exhausted provider window). 16 worker "
            "slots; retries `max_attempts 30, backoff_s 0.1`. Per resource class: `adaptive` (starts cold at 16 "
            "every round), `fixed` at 16 (retries only), and `fixed_at_n` (the oracle that knows the LM's "
            f"limit). Ideal: {ideal:.1f} s ({args.lines} × {args.latency:g} s / {args.lm_limit}). Rounds "
            f"interleaved, median of {args.rounds}. Other jobs share the machine's cores: numbers are noisy."
        )
        body = "\n".join([intro, "", *machine_lines(WORKERS), f"- whole run {elapsed:.0f} s", "",
                          markdown_table(headers, rows), "", *(reading(lm, samples, counts) for lm in LOCKOUTS)])
        write_section(HEADING, body)


if __name__ == "__main__":
    main()
