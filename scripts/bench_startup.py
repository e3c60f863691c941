"""Startup and planning (issue 18): validate + plan, the embedded `run` command, and `submit_program`.

    .venv/bin/python scripts/bench_startup.py [--rounds 7] [--baseline DIR] [--write-docs]

Four measures, each in fresh subprocesses, one case of each per round, rounds interleaved (medians
of ``--rounds`` >= 5); ``--baseline DIR`` adds the same four for the package exported in DIR:

- *validate + plan*: ``Program.from_dict(d).plan()`` of ``synthetic.dense_dag(1000)`` (~5000 edges);
  each round's sample is the median of 10 calls (wall, and CPU beside it).
- *embedded run*: the README's first command, ``dspex-celery run examples/rag.yaml -i question=...``
  (no broker): wall seconds and its CPU seconds; once with history on (the default, a SQLite file,
  here in a temporary ``XDG_DATA_HOME``) and once with ``DSPEX_HISTORY_URL=off``.
- *submit_program*: the client-side cost (plan + store + dispatch, until it returns) of a 200-module
  ``synthetic.random_dag`` on real workers and Redis, after two untimed submissions (a warm client);
  each execution is waited for, untimed.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchlib import (
    ROOT,
    Samples,
    WorkerSpec,
    cluster,
    fmt,
    interleaved,
    machine_lines,
    markdown_table,
    print_table,
    write_section,
)

from dspex_celery import Program, submit_program
from dspex_celery.examples import synthetic
from dspex_celery.runtime import Runtime
from dspex_celery.settings import Settings

HEADING = "Startup and planning (issue 18)"
WORKERS = [WorkerSpec(resources=("default",), concurrency=4, pool="threads")]
PLAN_GOAL_MS = 10.0
RUN_GOAL_S = 1.0
SUBMIT_GOAL_MS = 20.0
RUN_ARGS = ["run", "examples/rag.yaml", "-i", "question=What is a Celery chord?"]
SUBMIT_MODULES = 200
#: What the runs showed, under the table (appended to by each session that measures).
NOTES = (
    "Session 11 (AMD EPYC, 2 cores). First, history's tables became SQLAlchemy Core, not ORM models, so "
    "an embedded run no longer imports `sqlalchemy.orm` nor sets up its mappers: a run of this script "
    "just after that change gave history on 1.32 → 1.20 s against `343f8d7` interleaved (history off "
    "0.88 → 0.78 s: noise, nothing changed there). Then: a run's process spent ≈ 0.25–0.3 s after its "
    "last exit handler, in the interpreter's final garbage collections of the whole heap; the CLI now "
    "freezes the heap (`gc.freeze`) once its command is done, and SQLite history connections are not "
    "pooled (each closes with its transaction, so the exit has none to close and the WAL file goes with "
    "the last): this table, the baseline still `343f8d7`, history on 1.25 → 0.90 s, history off 0.95 → "
    "0.70 s. This machine's speed drifts by ±30 % within minutes, so only interleaved rows compare. In "
    "the dev venv (`.venv`: numpy, which fakeredis imports when it is installed, and the OpenTelemetry "
    "SDK) the same run takes ≈ 0.15 s more, so this table uses a venv of `pip install -e .` alone. "
    "validate + plan: 123.7 M instructions vs 125.2 M, unchanged; its time is spread over the dependency "
    "pass and Kahn's levels (≈ 36 %), module plans (≈ 18 %), pydantic's validation (≈ 16 %), the "
    "fingerprint's dump (≈ 13 %), the copy of the input (≈ 9 %) and the priorities (≈ 6 %). Pausing the "
    "cyclic GC during a plan cost instructions (103 → 116 M per plan in a bare loop: the collections only "
    "move to after it): not kept."
    " Session 12 (`a38f5af`, the baseline `cc3fcfa` exported beside it): validate + plan 12.5 → 9.5 ms (124.1 → 104.0 M instructions), this table. `Program.from_dict` parses valid data at once instead of deep-copying it first (validation builds its own mappings; only list and mapping *values* are copied, and invalid data is copied as before, so a caller that changes its mapping afterwards changes nothing); input references are looked up once per distinct value (a module output is read by several modules with the same string) and then per module in C; `max(..., default=)` (a keyword call per module) is gone from the priorities; and parsing, planning and reading a plan pause the cyclic garbage collector (`collector.without_collection`, as Mercurial's `util.nogc`): a 1000-module plan triggered ≈ 20 collections that traversed its live objects for nothing and moved them on towards full collections. Measured in real time this time (fresh subprocesses, median of 15 plans, 6–8 interleaved rounds): median 10.5 → 8.9 ms for the pause alone; the session-11 verdict above came from counting instructions in a bare loop, which the pause barely changes. A rewrite of Kahn's pass as one in-order depth pass was no quicker (the children lists and sorted parent tuples, not the pass, are its cost) and was not kept. The machine's speed still swings: one 7-round run of this script gave 13.9 vs 11.1 ms, the next 8.4 vs 12.6 ms; the instruction counts do not swing."
)
SEED = 1


@dataclass
class Cpu:
    """CPU seconds measured beside each case's wall seconds."""

    seconds: dict[str, list[float]] = field(default_factory=dict)

    def add(self, case: str, value: float) -> None:
        self.seconds.setdefault(case, []).append(value)

    def median(self, case: str) -> float | None:
        values = self.seconds.get(case)
        return statistics.median(values) if values else None


def run_case(cpu: Cpu, case: str, env: dict[str, str], venv: Path) -> Callable[[], float]:
    """Wall seconds of one embedded ``dspex-celery run`` subprocess of ``venv`` (its CPU seconds noted)."""
    command = [str(venv / "bin" / "dspex-celery"), *RUN_ARGS]

    def run() -> float:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if done.returncode != 0:
            raise RuntimeError(f"run exited {done.returncode}: {done.stderr.strip()[-200:]}")
        cpu.add(case, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
        return wall

    return run


PLAN, RUN_ON, RUN_OFF, SUBMIT = ("validate + plan", "embedded run, history on", "embedded run, history off",
                                 "submit_program")
BASELINE = " (baseline)"

#: The validate + plan case in a subprocess of the baseline tree: prints median wall and CPU seconds.
PLAN_SNIPPET = f"""
import statistics, time
from dspex_celery.examples import synthetic
from dspex_celery.program import Program
data = synthetic.dense_dag(1000, seed={SEED})
Program.from_dict(data).plan()
walls, cpus = [], []
for _ in range(10):
    wall, used = time.perf_counter(), time.process_time()
    Program.from_dict(data).plan()
    cpus.append(time.process_time() - used)
    walls.append(time.perf_counter() - wall)
print(statistics.median(walls), statistics.median(cpus))
"""

#: The submit_program case in a subprocess of the baseline tree (two untimed submissions first).
SUBMIT_SNIPPET = f"""
import sys, time
from dspex_celery.bootstrap import create_runtime
from dspex_celery.client import submit_program
from dspex_celery.examples import synthetic
from dspex_celery.program import Program
from dspex_celery.settings import Settings
runtime = create_runtime(Settings.model_validate_json(sys.argv[1]))
data = synthetic.random_dag({SUBMIT_MODULES}, seed={SEED})
for _ in range(3):
    program = Program.from_dict(data)
    wall, used = time.perf_counter(), time.process_time()
    handle = submit_program(program, {{}}, app=runtime.app)
    cpu, seconds = time.process_time() - used, time.perf_counter() - wall
    assert handle.get(timeout=120).succeeded
print(seconds, cpu)
"""


def snippet_case(cpu: Cpu, case: str, code: str, env: dict[str, str], *args: str) -> Callable[[], float]:
    """Wall seconds a snippet (run by the venv's python with ``env``) prints, with its CPU seconds
    (``-P``: the working directory is not put first on the path, so PYTHONPATH decides the package)."""
    def run() -> float:
        done = subprocess.run([sys.executable, "-P", "-c", code, *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"snippet exited {done.returncode}: {done.stderr.strip()[-300:]}")
        wall, used = (float(value) for value in done.stdout.split()[-2:])
        cpu.add(case, used)
        return wall

    return run


#: validate + plan N times (argv[1]) in a process callgrind counts: instructions per plan by difference.
COUNT_SNIPPET = f"""
import sys
from dspex_celery.examples import synthetic
from dspex_celery.program import Program
data = synthetic.dense_dag(1000, seed={SEED})
Program.from_dict(data).plan()
for _ in range(int(sys.argv[1])):
    Program.from_dict(data).plan()
"""
COUNTED_PLANS = 5


def plan_instructions(env: dict[str, str]) -> float:
    """Instructions (callgrind) per validate + plan: the difference of COUNTED_PLANS plans and none."""
    def collected(plans: int) -> int:
        done = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
                               "-P", "-c", COUNT_SNIPPET, str(plans)], cwd=ROOT, env=env, capture_output=True, text=True,
                              check=True)
        return int(re.findall(r"Collected : (\d+)", done.stderr)[-1])

    return (collected(COUNTED_PLANS) - collected(0)) / COUNTED_PLANS


def tree_cases(cpu: Cpu, env: dict[str, str], settings: Settings, venv: Path,
               suffix: str = "") -> dict[str, Callable[[], float]]:
    """The four measures, each in subprocesses of the package that ``env`` imports (``suffix``: case names;
    ``venv``: whose ``dspex-celery`` the embedded runs use)."""
    return {
        PLAN + suffix: snippet_case(cpu, PLAN + suffix, PLAN_SNIPPET, env),
        RUN_ON + suffix: run_case(cpu, RUN_ON + suffix, env, venv),
        RUN_OFF + suffix: run_case(cpu, RUN_OFF + suffix, {**env, "DSPEX_HISTORY_URL": "off"}, venv),
        SUBMIT + suffix: snippet_case(cpu, SUBMIT + suffix, SUBMIT_SNIPPET, env, settings.model_dump_json()),
    }


def baseline_env(tree: Path, env: dict[str, str]) -> dict[str, str]:
    """``env`` with ``tree`` (e.g. ``git archive`` of an older commit) first on PYTHONPATH."""
    return {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(tree), env.get("PYTHONPATH")]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7, at least 5)")
    parser.add_argument("--baseline", type=Path, default=None, metavar="DIR",
                        help="also measure the dspex_celery package in DIR (e.g. `git archive OLD dspex_celery "
                             "examples | tar -x -C DIR`), interleaved with this tree's")
    parser.add_argument("--callgrind", action="store_true",
                        help="also count the instructions of validate + plan with valgrind (load-independent)")
    parser.add_argument("--venv", type=Path, default=ROOT / ".venv", metavar="DIR",
                        help="the venv whose dspex-celery the embedded runs use (default .venv, which has the "
                             "test and bench extras; a venv of `pip install -e .` alone is what README's first "
                             "command makes)")
    parser.add_argument("--write-docs", action="store_true", help=f"write '{HEADING}' in docs/benchmarks.md")
    args = parser.parse_args()
    if args.rounds < 5:
        parser.error("--rounds must be at least 5 (medians of >= 5)")
    cpu = Cpu()
    with tempfile.TemporaryDirectory(prefix="dspex-bench-startup-") as data_home:
        env = {**os.environ, "XDG_DATA_HOME": data_home}
        env.pop("DSPEX_BROKER_URL", None)
        env.pop("DSPEX_HISTORY_URL", None)
        with cluster(WORKERS) as bench:
            cases = tree_cases(cpu, env, bench.settings, args.venv)
            if args.baseline is not None:
                cases |= tree_cases(cpu, baseline_env(args.baseline.resolve(), env), bench.settings, args.venv,
                                    BASELINE)
            samples = interleaved(cases, args.rounds)
        counts = {}
        if args.callgrind and shutil.which("valgrind"):
            counts[PLAN] = plan_instructions(env)
            if args.baseline is not None:
                counts[PLAN + BASELINE] = plan_instructions(baseline_env(args.baseline.resolve(), env))
    report(args, samples, cpu, counts)


def report(args: argparse.Namespace, samples: dict[str, Samples], cpu: Cpu, counts: dict[str, float]) -> None:
    headers = ["measure", "case", "runs", "median wall", "median CPU", "goal", "verdict"]
    measures = [
        (PLAN, "dense_dag 1000 modules / ~5000 edges", 1000, "ms", PLAN_GOAL_MS),
        (RUN_ON, "`dspex-celery run examples/rag.yaml`, history on (default)", 1, "s", RUN_GOAL_S),
        (RUN_OFF, "the same, `DSPEX_HISTORY_URL=off`", 1, "s", RUN_GOAL_S),
        (SUBMIT, f"random_dag {SUBMIT_MODULES} modules, warm client, real workers", 1000, "ms", SUBMIT_GOAL_MS),
    ]
    rows = [row(name, what, samples, cpu, scale, unit, goal)
            for case, what, scale, unit, goal in measures
            for name in (case, case + BASELINE) if name in samples]
    print_table(HEADING, headers, rows)
    counted = [f"- instructions per validate + plan (callgrind, {COUNTED_PLANS} plans less none): "
               + ", ".join(f"{name}: {value / 1e6:.1f} M" for name, value in counts.items())] if counts else []
    for line in counted:
        print(line)
    if not args.write_docs:
        return
    body = "\n".join([
        f"`scripts/bench_startup.py --rounds {args.rounds}"
        + (f" --baseline {args.baseline}" if args.baseline is not None else "")
        + (" --callgrind" if counts else "")
        + (f" --venv {args.venv}" if args.venv != ROOT / ".venv" else "")
        + "`: each measure in fresh subprocesses, one case of each per round, rounds interleaved, medians. "
        "*validate + plan*: `Program.from_dict(d).plan()` (each round: the median of 10 calls). *embedded "
        "run*: the README's first command, no broker, history in a temporary `XDG_DATA_HOME` (on: the "
        "default SQLite file; off: `DSPEX_HISTORY_URL=off`); CPU is user + system of the process; "
        + (f"the `dspex-celery` of `{args.venv}`, a venv of `pip install -e .` alone, as the command makes it. "
           if args.venv != ROOT / ".venv" else "the dev venv's `dspex-celery` (test and bench extras: numpy, "
           "which fakeredis then imports, and the OpenTelemetry SDK; README's command installs neither). ")
        + "*submit_program*: the client's time until `submit_program` returns (plan, store, dispatch) on one "
        "worker (threads, concurrency 4) and Redis, after two untimed submissions; each execution is then "
        "waited for, untimed. The machine was shared with other jobs (see the load below), so wall times "
        "are noisy; CPU times less so."
        + (f" *(baseline)* rows: the same measures of the package exported in `{args.baseline}` (an older "
           "commit), interleaved with this tree's; its submissions use the same workers."
           if args.baseline is not None else ""),
        "",
        markdown_table(headers, rows),
        "",
        *counted,
        *machine_lines(WORKERS),
        "",
        NOTES,
    ])
    write_section(HEADING, body)


def row(case: str, what: str, samples: dict[str, Samples], cpu: Cpu, scale: float, unit: str,
        goal: float) -> list[str]:
    """One table row: the case's medians in ``unit`` (seconds times ``scale``) and its verdict."""
    wall = samples[case].median
    used = cpu.median(case)
    digits = 1 if unit == "ms" else 2
    shown = (lambda value: "—" if value is None else f"{fmt(value * scale, digits)} {unit}")
    if wall is None:
        verdict = f"failed: {samples[case].failure}"
    else:
        verdict = "met" if wall * scale <= goal else "not met"
    return [case, what, str(len(samples[case].values)), shown(wall), shown(used), f"≤ {goal:g} {unit}", verdict]


if __name__ == "__main__":
    main()
