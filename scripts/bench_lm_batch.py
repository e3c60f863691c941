"""LM batch throughput: ``dspy.Evaluate`` in one process vs a dspex-celery batch on real workers.

    .venv/bin/python scripts/bench_lm_batch.py [--lines 480] [--threads 16] [--rounds 3] [--write-docs]
    .venv/bin/python scripts/bench_lm_batch.py --quick     # smoke run: few lines, one round, no docs

The same program on both sides: ``examples/dspy_rag.yaml`` (Retrieve -> Generate, a ChainOfThought
with its compiled demos) whose LM is ``dspex_celery.examples.latency_lm`` (the offline DummyLM, 100 ms per call,
uncached). ``dspy.Evaluate(num_threads=T)`` runs it in this process; ``submit_batch`` runs it on
real ``dspex-celery worker`` subprocesses with T threads in all, in each ``--layouts`` layout
(processes x threads, e.g. 2x8,8x2; 2x8 by default), side by side on this machine.
Rounds interleaved; medians of lines/s and of CPU ms per module (client + worker processes' CPU
time over the modules run; Evaluate: this process over its module calls, two per line).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import dspy
import psutil
import redis
import yaml
from benchlib import (
    REDIS_URL,
    ROOT,
    WorkerSpec,
    cluster,
    fmt,
    interleaved,
    machine_lines,
    markdown_table,
    print_table,
    ratio,
    write_section,
)
from dspex_celery.examples.latency_lm import LATENCY_S, latency_lm

from dspex_celery import Program, submit_batch
from dspex_celery.examples.dspy_rag import OFFLINE_ANSWERS, Generate, Retrieve

HEADING = "LM batch throughput vs dspy.Evaluate (issue 17)"
EXAMPLE = ROOT / "examples" / "dspy_rag.yaml"
MODULES_PER_LINE = 2
QUESTIONS = [f"What is {topic}?" for topic in OFFLINE_ANSWERS] + ["How do I bake bread?"]
#: The section's history paragraph, kept under the table (update it with each before/after).
HISTORY = (
    "History (same script; this shared 2-core machine makes every number noisy). Before the issue 17 "
    "throughput work (code `de35094`, under load: a chain batch ran as `levels`, a pub/sub-less MGET of "
    "every in-flight result every 20 ms, five round trips per submitted line): 23.4 lines/s, 0.17× "
    "`dspy.Evaluate`, 25.4 CPU ms / module. At `e59ab90` (quiet machine): 113.2 lines/s, 0.77× (147.9), "
    "6.1 CPU ms / module. Then (`743a713`): finishing an execution takes 3 round trips instead of 11 (the"
    " finish claim and the reads of the result in one Lua script; the Celery result and the meta status "
    "in another; the history finished event with the record events still queued, in one pipeline), the "
    "allow-list check resolves a module's `uses` once per process and a batch's plan text is parsed once "
    "per worker: a worker thread makes 8 round trips per line instead of 16 (MONITOR on one line; Redis "
    "commands per line, those inside scripts included, stay ≈ 100), but throughput and CPU moved within "
    "the noise (0.76×, 5.4 CPU ms / module under light load); one worker thread over 100 lines, interleaved with the `e59ab90` files: "
    "111.3 vs 110.9 ms per line on a quiet machine, 2–4 % less under load 3–4. At `b272be1` (all of session 7's "
    "changes, quiet machine, this table): 0.82×, 4.5 CPU ms / module — the CPU goal (≤ 5 ms"
    " / module) is met, the throughput goal (≥ 0.9×) is not. Where the rest goes (2×8 threads, per line): a worker thread holds a line ≈"
    " 130 ms (Celery's `succeeded in`), `dspy.Evaluate` ≈ 108 ms; per-thread CPU from /proc: the pool "
    "threads ≈ 8 ms (DSPy's own work ≈ 3.4 ms of it, the engine ≈ 2.4 ms per module: Celery's task "
    "machinery, `begin`/`save_success` and the finish, pydantic records, JSON), the consumer thread ≈ 1 "
    "ms, the history publisher ≈ 0.25 ms; the rest is waiting for the GIL behind the other threads' CPU, "
    "and each thread idles ≈ 5–10 % between lines while the consumer fetches its next message after an "
    "ack (prefetch 1). Worker layouts (`--layouts`, 16 threads in all, quiet machine, session 7): alone, "
    "8×2 reached 0.87× and 4×4 0.83× against 0.77–0.79× for 2×8 (fewer threads per process wait less "
    "for the GIL); run side by side in one invocation, with the other layouts' workers idle beside them, "
    "2×8 / 4×4 / 8×2 gave 0.79× / 0.84× / 0.80× — within the noise of each other. Prefetch 2 instead of "
    "1: 0.82× for 2×8, 0.82× for 8×2 (not kept: it lets a busy worker hold messages an idle one could run, "
    "which `dag`'s priorities rely on). Session 8 (quiet machine, load ≈ 1, 3 rounds each): at `d9a3657` "
    "0.81× (123.6 vs 152.7 lines/s), 5.3 CPU ms / module. A slot that ends a line now takes the next "
    "line's queued module into its chain (take-next across `dag` executions): 241 BRPOPs for 960 lines, "
    "0.82×, 4.6 CPU ms / module — the idle gap between lines was not what held throughput back. Tried "
    "and not kept: a GIL switch interval of 1 ms / 0.2 ms in the workers (0.79× / 0.78×); the prefork "
    "pool, 2×8 (0.83×); layouts side by side 2×8 / 4×4 / 8×2 (0.79× / 0.82× / 0.82×); `max_in_flight` 16 / 64 "
    "(0.75× / 0.81×). CPU per line (960 lines, psutil): client 1.8 ms, workers 7.5–8.0 ms, Redis 1.2 ms. "
    "Records: Generate 105.2 ms median (100 ms of it the LM), Retrieve 1.4 ms, so at ≈ 126 ms of slot "
    "time per line ≈ 19 ms are outside the module calls. py-spy on a worker (wall time of its pool "
    "threads): the LM's sleep 74 %, the rest of the DSPy call 6 %, the store scripts (begin, save + "
    "count, finish claim, result) 9 %, waiting for a message 6 %; a script call takes ≈ 2 ms of a "
    "thread's wall time against ≈ 0.1 ms of Redis time (waiting for a core and the GIL once the reply is "
    "in). Then the last module's count also claims the finish (0.82×, 4.6 CPU ms / module) and the script "
    "that publishes the result also appends the history events (0.83×, 4.4): 5 scripts per line instead "
    "of 6 and one pipeline less (`INFO commandstats` over 960 lines: EVALSHA 5.0 per line, MULTI/EXEC 1.34, "
    "BRPOP 0.23; ≈ 100 commands per line, those inside scripts included). What is left to fold: the begin "
    "of a continued module into the count that leases it (a batch's Generate is seldom continued: other "
    "lines' Retrieve messages are more urgent), and less CPU per module (workers ≈ 8 ms per line)."
    " " +
    "Session 9 ran on another machine (AMD EPYC, 2 cores: `dspy.Evaluate` still reaches ≈ 150 "
    "lines/s, but every engine CPU millisecond costs more): at `7a42140`, runs of 3 rounds gave "
    "0.67–0.76× (99–113 lines/s), 6.3–7.7 CPU ms / module, and the end of the session the same "
    "spread (0.73–0.77×, 5.9–6.4; old and new code interleaved: 113.0 / 99.7 vs 109.5 / 114.8 "
    "lines/s), so this session's changes do not show here. Per line (psutil, 480 lines): workers "
    "11.8 ms (DSPy's own work ≈ 4.2 ms of it, as in Evaluate), client 2.7 ms, Redis ≈ 2.5 ms "
    "(EVALSHA ≈ 220 µs mean) — ≈ 17 ms of CPU per line against Evaluate's 4.2, ≈ 1.8 of the 2 cores "
    "busy: the batch is CPU-bound on this machine, so a saved round trip does not show (serving the "
    "batch's plan from a per-process cache instead of one GET per line: 97 vs 103.5 lines/s, noise). "
    "Records: Generate 111 ms median, Retrieve 3.1 ms; module calls fill 80 % of the slot time. "
    "Inside Redis (TIME probes in the scripts): a count that takes the next module spent ≈ 55 µs in "
    "`cjson.decode` of that message's ≈ 1.2 KB; take-next now reads the short lead a dag message "
    "carries first instead. A round trip to Redis costs 0.11 ms back to back but 0.59 ms (p50) after "
    "the caller slept 5 ms (this VM's idle vCPUs halt)."
    " Session 10 (the same AMD machine, a fresh one of its kind): at `1bf74b4`, 0.82× (125.0 vs 152.8 "
    "lines/s), 4.6 CPU ms / module. Probes on the workers' pool threads (480–960 lines): the slots are "
    "busy 97 % of the time; a line holds a slot ≈ 117–122 ms, of which the module calls ≈ 104 ms (what "
    "`dspy.Evaluate` needs for a whole line) and the engine ≈ 13–17 ms, nearly all of it six Redis round "
    "trips (the plan read, a begin and a save + count per module, the result's publication) at ≈ 1.5–2.5 "
    "ms of wall time each against ≈ 0.12 ms inside Redis and ≈ 0.3 ms of the thread's CPU. A round trip "
    "costs that much under load whatever the layout (16×1: 1.3–2.2 ms), the GIL switch interval (0.5 ms: "
    "no better), Redis's or the client's CPU priority (renice: no change) or redis-py's own overhead (a "
    "bare connection without its health checks: no change); an external PING meanwhile takes 0.45 ms "
    "(mean). Now a continued child is begun by the count that leases it (begins per line 2.00 → 1.14) and"
    " a worker that parsed a plan's text finds it by the digest its task messages carry (plan reads per "
    "line 1.0 → 0): 0.85× (131.0 vs 153.6), 4.2 CPU ms / module (this table); old and new workers side by"
    " side, 8 interleaved rounds: 126.2 vs 127.6 lines/s. Every round trip taken off a slot made the "
    "others slower by about as much (the plan read gone: begin 1.5 → 1.8 ms, save 2.2 → 2.6 ms; the same "
    "when the result was published by a background thread, or sent without waiting for its reply — "
    "neither kept): what bounds a line here is the CPU and the GIL the worker processes share on two "
    "cores, not the count of round trips. Layouts side by side (3 rounds): 2×8 / 4×4 / 8×2 gave 0.82× / "
    "0.85× / 0.84×."
    " Session 11 (the same kind of machine; no change to the batch path since session 10): a 5-round run "
    "0.88× (134.2 vs 151.7 lines/s; its rounds 129.5–138.5 against Evaluate's 145.4–154.0), 4.1 CPU ms "
    "/ module; a 2-round run just before it gave 0.85× (130.3 vs 153.7). The machine's CPU busy time "
    "(/proc/stat, 1 s samples) over the batch rounds: 57–71 % of the two cores (Evaluate's rounds: 16–22 "
    "%), so the cores are not saturated on average here: a line's engine time in its slot is spent "
    "waiting (on Redis replies and on the GIL), not queued behind a full machine. A probe of the workers' "
    "garbage collector (gc.callbacks) over a run: each worker made one full collection during the batch "
    "rounds, 108–130 ms with DSPy and litellm loaded, every thread of the process stalled meanwhile; "
    "workers now freeze their heap (`gc.collect` + `gc.freeze`) when ready and after their first task, "
    "and no full collection happens during the rounds (the young generations' collections stay: ≈ 0.1 s "
    "per worker per run). Old and new workers side by side, 5 interleaved rounds, twice: 130.8 → 132.6 "
    "and 133.0 → 135.8 lines/s (+1–2 %, within a round's spread); this table, after it: 0.85× (131.0 vs "
    "153.2; rounds 124.6–135.2), 4.2 CPU ms / module. py-spy `--gil` on one worker during a batch (which "
    "thread holds the GIL): the consumer's main thread 26 % of the samples (kombu's Redis transport "
    "reading and decoding messages 12 %, their acks 7.7 %), the pool threads 70 % (DSPy's Generate 22.5 "
    "%, the store's script calls 15 %, most of it redis-py's own Python per command: its pool's pid "
    "checks, retry and event wrappers, the reply parser; the finish 10 %)."
    " Session 12 (a fresh machine of the same kind; no change to the batch path): two 7-round runs of the same code ten minutes apart gave 0.90× (140.5 vs 155.3 lines/s, 3.0 CPU ms / module: this table) and 0.86× (132.0 vs 153.7, 4.1 CPU ms / module) — the ratio follows the engine's CPU cost per module, i.e. how fast the shared machine runs at the moment, while `dspy.Evaluate` (which sleeps on its LM) barely moves; so the goal is met at the machine's quick moments only. Where a line's slot time went in the quick phase (records of 480-line batches): module calls 106 ms per line (`dspy.Evaluate`: ≈ 103 ms for the whole line), slots 113–114 ms per line, so ≈ 7–8 ms per line between module calls; py-spy `--idle` on a worker's pool threads over a 960-line batch: the LM's sleep ≈ 90 %, waiting for Redis replies ≈ 4.3 ms per line (the two counts 61 % of it, ≈ 1.3 ms each against ≈ 0.12 ms inside Redis; the result's publication 18 %; begins 17 %). A batch's fixed cost (wall against lines, 16 / 240 / 480 lines): ≈ 60 ms, 1.7 % of a 480-line batch — the first wave's 16 messages reach the slots over ≈ 35 ms, each worker's consumer taking its eight one by one — and the asymptotic rate 138.9 lines/s (0.91×) in that run."
    " Session 13 (a fresh machine of the same kind): the batch path changed only by a check of each message the consumer takes in (malformed task fields are dropped): 0.87× and 0.88× (132.2 vs 152.6, 134.4 vs 153.1 lines/s; 4.4 and 3.9 CPU ms / module), before and after. Probes in the workers (960-line batches, means per module, medians in brackets): Generate's call 105.6 ms (104.0), Retrieve's 0.3 ms (median); a line's slot time ≈ 126 ms, of which the module calls ≈ 104.3 and the engine ≈ 12 (medians) to 18 ms (means): Retrieve's count 4.5 (3.0), Generate's count 8.8 (6.5: its save script 3.6, the finish 4.7 with the result's publication 3.5), each module's start 2.1 (0.9, the begin script 2.5 when it has its own), so the waits have long tails (p90 of a script call 5–8 ms against a median of 1.5–2.3). Per-thread CPU (/proc, per line): pool threads 6.3 ms, consumer main threads 0.38, history publishers 0.28, client 1.0, Redis 1.23; inside Redis (SLOWLOG) the two counts take ≈ 270 and 255 µs, the publication 105, a begin 80. What the time is not: a CPU hog beside the batch (20 % / 40 % of a core: 124 → 125 and 128.6 → 122.9 lines/s) or two nice-19 spinners keeping both vCPUs awake (129.1 → 127.6, 134.3 → 133.0) barely move it; one worker of 16 threads is worse than two of 8 (0.76× vs 0.81×, side by side): the slot waits on its process's GIL, which each worker's threads hold ≈ 40 % of the time (py-spy --gil) for ≈ 22 % of a core of CPU. Tried, not kept: chains not bounded at 8 modules (DSPEX_DAG_CONTINUATION=1000, two worker sets side by side, 6 rounds: 126.8 vs 130.1 lines/s, within the spread); a script call on a bare connection instead of redis-py's Script (80 vs 123 µs of CPU per call: ≈ 0.15 ms per line)."
    " Session 14 ran on an Intel Xeon machine (2 cores): 0.68× before and after its change (a killed pool process's "
    "chain re-queues its lease at once), 7.3–7.7 CPU ms / module — on that machine the engine's CPU costs about twice "
    "as much, and neither goal is met there. Session 15 (AMD EPYC again), two 5-round runs: 0.89× (137.0 vs 153.9 lines/s; rounds "
    "132.6–141.5 against 147.3–154.5), 3.8 CPU ms / module, and 0.88× (134.1 vs 152.4), 4.0 CPU ms / module, this table. Tried, not kept: continuing a line's own child "
    "even when another line's more urgent module is queued (depth-first per line; the count's urgency check skipped): "
    "0.87× (133.6 vs 152.9) in the next run, within the spread. Session 16 (a fresh AMD EPYC machine, no change to the "
    "batch path): 5-, 4- and 8-round runs gave 0.92× (143.0 vs 155.8 lines/s, 2.8 CPU ms / module), 0.89× (138.2, "
    "3.3) and 0.88× (134.8 vs 153.7, 3.7; py-spy attached to a worker for 30 s): met in the machine's quick runs only."
    " Session 17 (a fresh AMD EPYC machine): the store's scripts now go over a direct connection per thread "
    "(redis-py makes and logs it in; hiredis packs each EVALSHA and parses its reply: ≈ 52 vs 130 µs of CPU per"
    " call in a loop against redis-py 8.1's `Script`), the history publisher sends its record events in one "
    "such script instead of a redis-py pipeline (yappi on a worker: the pipeline was ≈ 15 % of a chained "
    "worker's CPU), a count's queue lists are cached per worker (≈ 40 key names per module with three resource "
    "classes) and a signature reads the broker URL once per app. Old and new code side by side, three pairs of "
    "3-round runs: 0.89× / 0.90× / 0.88× (136.0 / 137.8 / 134.6 lines/s, 3.8–4.1 CPU ms / module) before, 0.91×"
    " / 0.91× / 0.91× (139.9 / 138.7 / 139.5, 3.4–3.5) after; this table (5 rounds, after them): 0.91×, 3.5 CPU"
    " ms / module. A worker's CPU per no-op module (one worker, 2 threads, `dag`): 1.28–1.48 → 1.01–1.08 ms in "
    "a 400-module fan-out, 0.98–1.04 → 0.87–0.90 ms in a 400-module chain."
    " Three more 5-round runs at the end of the session: 0.90× (136.4 vs 151.7 lines/s: 0.899), 0.92× (141.0) "
    "and 0.90× (137.1), 3.4–3.9 CPU ms / module: every run after the change shows 0.90–0.92× as the table "
    "rounds it, one of them 0.899 unrounded — met, by a thin margin."
)


def dataset(count: int) -> list[dict[str, str]]:
    """Distinct questions (a line number in each), cycling over the example's topics."""
    return [{"question": f"{QUESTIONS[index % len(QUESTIONS)]} (line {index})"} for index in range(count)]


def cluster_program() -> Program:
    """The RAG example with the latency LM (allow-listed on the workers)."""
    data = yaml.safe_load(EXAMPLE.read_text())
    data["dspy"] = {"lm": "dspex_celery.examples.latency_lm:latency_lm"}
    program = Program.from_dict(data)
    program.base_dir = EXAMPLE.parent  # its state: path is relative to the example
    return program


class RAG(dspy.Module):
    """The same two modules, composed in-process as a DSPy user would for ``dspy.Evaluate``."""

    def __init__(self) -> None:
        super().__init__()
        self.retrieve = Retrieve(k=2)
        self.generate = Generate()
        self.generate.load(str(EXAMPLE.parent / "dspy_rag.state.json"))

    def forward(self, question: str) -> dspy.Prediction:
        found = self.retrieve(question=question)
        return self.generate(question=question, context=found.passages)


def answered(example: Any, prediction: Any, trace: Any = None) -> bool:
    return bool(getattr(prediction, "answer", None))


# --- measuring ---------------------------------------------------------------------------------


@dataclass
class Meter:
    """CPU seconds of this process and of worker processes (their pool children included) between
    two readings (this process's own children are the workers: not counted twice)."""

    workers: Sequence[int] = ()
    _start: float = 0.0

    def cpu_s(self) -> float:
        times = psutil.Process().cpu_times()
        total = times.user + times.system
        for pid in self.workers:
            try:
                process = psutil.Process(pid)
                for each in [process, *process.children(recursive=True)]:
                    times = each.cpu_times()
                    total += times.user + times.system
            except psutil.NoSuchProcess:
                continue
        return total

    def __enter__(self) -> Meter:
        self._start = self.cpu_s()
        return self

    def __exit__(self, *_: object) -> None:
        self.used_s = self.cpu_s() - self._start


@dataclass
class Case:
    """lines/s (returned to ``interleaved``) and CPU ms per module of each run."""

    run_once: Callable[[], tuple[float, float]]
    cpu_ms: list[float] = field(default_factory=list)

    def __call__(self) -> float:
        lines_per_s, cpu_ms = self.run_once()
        self.cpu_ms.append(cpu_ms)
        return lines_per_s


def evaluate_case(lines: int, threads: int) -> Case:
    rag = RAG()
    devset = [dspy.Example(**line).with_inputs("question") for line in dataset(lines)]

    def run() -> tuple[float, float]:
        evaluate = dspy.Evaluate(devset=devset, metric=answered, num_threads=threads, display_progress=False)
        with Meter() as meter:
            start = time.perf_counter()
            result = evaluate(rag)
            wall = time.perf_counter() - start
        if round(result.score) != 100:
            raise RuntimeError(f"dspy.Evaluate scored {result.score}")
        return lines / wall, 1000 * meter.used_s / (lines * MODULES_PER_LINE)

    return Case(run)


def batch_case(bench: Any, program: Program, lines: int, max_in_flight: int) -> Case:
    pids = [worker.process.pid for worker in bench.workers]

    def run() -> tuple[float, float]:
        with Meter(pids) as meter:
            start = time.perf_counter()
            result = submit_batch(program, dataset(lines), app=bench.runtime.app, max_in_flight=max_in_flight).get()
            wall = time.perf_counter() - start
        failed = [line for line in result.lines if not line.succeeded]
        if failed:
            raise RuntimeError(f"{len(failed)} lines did not succeed, e.g. {failed[0].status}: {failed[0].error}")
        return lines / wall, 1000 * meter.used_s / (lines * MODULES_PER_LINE)

    return Case(run)


def redis_cpu_s() -> float:
    info = redis.Redis.from_url(REDIS_URL).info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


# --- the run -----------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=480, help="lines per run (default 480)")
    parser.add_argument("--threads", type=int, default=16, help="threads in all, both sides (default 16)")
    parser.add_argument("--layouts", default=None, type=layouts,
                        help="worker layouts run side by side, PROCESSESxTHREADS each, comma-separated; "
                             "every layout has --threads threads in all (default: 2 processes sharing them)")
    parser.add_argument("--pool", default="threads", choices=["threads", "prefork"], help="worker pool")
    parser.add_argument("--max-in-flight", type=int, default=None, help="batch bound (default 2 x threads)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per case (median reported)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 64 lines, 1 round, no docs")
    parser.add_argument("--write-docs", action="store_true", help=f"write the '{HEADING}' section")
    args = parser.parse_args()
    if args.quick:
        args.lines, args.rounds, args.write_docs = 64, 1, False
    args.max_in_flight = args.max_in_flight or 2 * args.threads
    args.layouts = args.layouts or [(2, max(1, args.threads // 2))]
    wrong = [f"{workers}x{threads}" for workers, threads in args.layouts if workers * threads != args.threads]
    if wrong:
        parser.error(f"--layouts {','.join(wrong)}: each layout needs {args.threads} threads in all (--threads)")
    return args


def layouts(text: str) -> list[tuple[int, int]]:
    """``2x8,8x2`` -> [(2, 8), (8, 2)]: worker processes x threads each."""
    try:
        pairs = [tuple(int(part) for part in item.lower().split("x")) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: write layouts as PROCESSESxTHREADS, e.g. 2x8,8x2") from None
    if not pairs or any(len(pair) != 2 or min(pair) < 1 for pair in pairs):
        raise argparse.ArgumentTypeError(f"{text!r}: write layouts as PROCESSESxTHREADS, e.g. 2x8,8x2")
    return [(pair[0], pair[1]) for pair in pairs]


def main() -> None:
    args = parse_args()
    dspy.configure(lm=latency_lm())
    program = cluster_program()
    started = time.monotonic()
    redis_before = redis_cpu_s()
    with contextlib.ExitStack() as stack:
        cases = {f"dspy.Evaluate(num_threads={args.threads})": evaluate_case(args.lines, args.threads)}
        all_workers: list[WorkerSpec] = []
        for processes, threads in args.layouts:
            workers = [WorkerSpec(resources=("default", "io", "llm"), concurrency=threads, pool=args.pool)] * processes
            bench = stack.enter_context(cluster(workers))
            all_workers += workers
            cases[f"dspex-celery batch ({processes}×{threads} threads)"] = batch_case(
                bench, program, args.lines, args.max_in_flight)
        for case in cases.values():  # warm-up: imports, adapters, LMs built once per process
            case()
            case.cpu_ms.clear()
        samples = interleaved(dict(cases), args.rounds)
    elapsed = time.monotonic() - started
    redis_used = redis_cpu_s() - redis_before
    names = list(cases)
    baseline = samples[names[0]].median
    headers = ["case", "lines", "runs", "lines/s median", "min", "max", "vs dspy.Evaluate", "CPU ms / module"]
    rows = [
        [name, str(args.lines), str(len(sample.values)), fmt(sample.median, 1),
         fmt(min(sample.values, default=None), 1), fmt(max(sample.values, default=None), 1),
         fmt(ratio(sample.median, baseline), 2) + "×",
         fmt(statistics.median(cases[name].cpu_ms) if cases[name].cpu_ms else None, 1)]
        for name, sample in samples.items()
    ]
    print_table("LM batch throughput", headers, rows)
    print(f"shared Redis CPU over the whole run (all its clients): {redis_used:.1f} s")
    if args.write_docs:
        write_docs(args, all_workers, rows, headers, elapsed)


def write_docs(args: argparse.Namespace, workers: list[WorkerSpec], rows: list[list[str]], headers: list[str],
               elapsed: float) -> None:
    intro = (
        "`.venv/bin/python scripts/bench_lm_batch.py --write-docs` — the same two-module DSPy program "
        "(`examples/dspy_rag.yaml`: Retrieve → Generate, a ChainOfThought with compiled demos) over "
        f"{args.lines} distinct questions, its LM the offline DummyLM taking {LATENCY_S * 1000:g} ms per "
        f"call, uncached (`dspex_celery/examples/latency_lm.py`). `dspy.Evaluate(num_threads={args.threads})` runs it in "
        f"the benchmark's process; `submit_batch(max_in_flight={args.max_in_flight})` runs one execution "
        f"per line on real `dspex-celery worker` subprocesses, {args.threads} threads in all, in each layout "
        f"({', '.join(f'{p} processes × {t} threads' for p, t in args.layouts)}; every layout's workers are "
        "started before the rounds and idle while another case runs) on the same machine, Redis as broker "
        "and state store. Rounds interleaved, medians of "
        f"{args.rounds}. CPU ms / module: CPU time of the client and worker processes (Evaluate: its one "
        "process) over the modules run (two per line); Redis's own CPU is not in it. Other jobs share "
        "the machine's 2 cores, so the numbers are noisy."
    )
    body = "\n".join([intro, "", *machine_lines(workers), f"- whole run {elapsed:.0f} s", "",
                      markdown_table(headers, rows), "", HISTORY])
    write_section(HEADING, body)


if __name__ == "__main__":
    main()
