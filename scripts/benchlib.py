"""Reusable benchmark harness: real worker subprocesses, timed runs, interleaved medians, docs sections.

Used by the ``bench_*.py`` scripts next to it (run them from the repository root with the venv's
python). Every cluster gets its own namespace on real Redis and is cleaned up on exit.
"""

from __future__ import annotations

import datetime as dt
import heapq
import os
import platform
import re
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import celery
from rich.console import Console
from rich.table import Table

from dspex_celery import ExecutionStatus, Program, submit_program
from dspex_celery.history.store import open_history
from dspex_celery.optimizer import Report, optimize
from dspex_celery.runtime import Runtime
from dspex_celery.settings import Settings
from dspex_celery.testing import (  # noqa: F401  (purge_namespace: used by the bench scripts)
    Cluster,
    ListenerProcess,
    WorkerProcess,
    fresh_namespace,
    purge_namespace,
)

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
REDIS_URL = os.environ.get("DSPEX_BENCH_REDIS_URL", "redis://127.0.0.1:6379/4")
BENCH_MODULES = "dspex_celery.examples"
BENCH_TTL_S = 900  # state and results of benchmark runs expire quickly
BENCHMARKS_MD = ROOT / "docs" / "benchmarks.md"

console = Console(width=max(150, shutil.get_terminal_size((150, 40)).columns))


# --- workers ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSpec:
    """How to start one `dspex-celery worker`."""

    resources: tuple[str, ...] = ("default",)
    concurrency: int = 4
    pool: str = "prefork"
    includes: tuple[str, ...] = ()

    def describe(self) -> str:
        extra = f", --include {' '.join(self.includes)}" if self.includes else ""
        return f"resources {'+'.join(self.resources)}, --pool {self.pool} --concurrency {self.concurrency}{extra}"


@dataclass
class BenchCluster:
    """Workers in a fresh namespace on real Redis, plus the client runtime that talks to them."""

    specs: Sequence[WorkerSpec]
    redis_url: str = REDIS_URL
    namespace: str = field(default_factory=lambda: fresh_namespace("bench"))
    logdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="dspex-bench-")))
    cluster: Cluster = field(init=False)

    def __post_init__(self) -> None:
        # own sessions: a hung worker's pool is killed with it; the scripts directory importable for --include
        self.cluster = Cluster(self.settings, self.logdir, cwd=ROOT, pythonpath=(ROOT, SCRIPTS),
                               extra_env={"DSPEX_STATE_TTL_S": str(BENCH_TTL_S)}, new_session=True)

    @property
    def settings(self) -> Settings:
        return Settings(broker_url=self.redis_url, namespace=self.namespace, modules=BENCH_MODULES,
                        state_ttl_s=BENCH_TTL_S)

    @property
    def runtime(self) -> Runtime:
        return self.cluster.runtime

    @property
    def workers(self) -> list[WorkerProcess]:
        return self.cluster.workers

    def env(self) -> dict[str, str]:
        """Environment of a subprocess of this cluster."""
        return self.cluster.env()

    def start(self) -> None:
        """Start every worker, then wait until all are ready."""
        for spec in self.specs:
            includes = tuple(arg for module in spec.includes for arg in ("--include", module))
            self.cluster.start_worker(*spec.resources, concurrency=spec.concurrency, pool=spec.pool,
                                      extra_args=includes, wait=False)
        for worker in self.workers:
            worker.wait_ready(timeout=60)

    def stop(self) -> None:
        """Stop the workers (SIGKILL of a worker still running after 20 s) and delete this namespace's
        queues and state keys."""
        for worker in self.workers:
            worker.stop(timeout=20)
        self.cluster.stop()

    def restart(self) -> None:
        """Fresh workers and empty queues: used after a run timed out and left work behind."""
        self.stop()
        self.start()

    def run(self, program: dict[str, Any], strategy: str, timeout: float) -> float:
        """Submit ``program`` and wait for it; wall seconds from submit to result (raises if it failed)."""
        start = time.perf_counter()
        handle = submit_program(Program.from_dict(program), {}, strategy=strategy, app=self.runtime.app)
        result = handle.get(timeout=timeout)
        wall = time.perf_counter() - start
        if result.status is not ExecutionStatus.SUCCEEDED:
            raise RuntimeError(f"{program['name']} ({strategy}) {result.status.value}: {result.error}")
        return wall


def start_listener(bench: BenchCluster, url: str) -> ListenerProcess:
    """A `dspex-celery listener` recording the cluster's history into ``url``, once it is ready."""
    listener = bench.cluster.start_listener(url, wait=False)
    listener.wait_ready(timeout=60)
    return listener


def learn_profile(url: str, program: str, execution_ids: Sequence[str], timeout: float = 60) -> Report:
    """Wait until the listener recorded these executions, then ``optimize`` the program (saves its profile)."""
    history = open_history(url)
    deadline = time.monotonic() + timeout
    while len(history.final_ids(list(execution_ids))) < len(execution_ids):
        if time.monotonic() > deadline:
            raise RuntimeError("the listener did not record the learning runs")
        time.sleep(0.1)
    return optimize(history, program)


@contextmanager
def cluster(specs: Sequence[WorkerSpec]) -> Iterator[BenchCluster]:
    """A started :class:`BenchCluster`, stopped and purged on exit (also on Ctrl-C)."""
    bench = BenchCluster(specs)
    try:
        bench.start()
        yield bench
    finally:
        bench.stop()


# --- timing -----------------------------------------------------------------------------------


class Timeout(Exception):
    """A case ran past its time budget."""


@dataclass
class Samples:
    """Seconds measured for one case; ``failure`` once it timed out or failed (no more runs)."""

    values: list[float] = field(default_factory=list)
    failure: str | None = None

    @property
    def median(self) -> float | None:
        return statistics.median(self.values) if self.values else None


def time_calls(function: Callable[[], Any], repeats: int, warmup: int = 1) -> Samples:
    """Seconds of ``repeats`` calls of ``function`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        function()
    samples = Samples()
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        samples.values.append(time.perf_counter() - start)
    return samples


def interleaved(
    cases: dict[str, Callable[[], float]],
    repeats: int,
    on_failure: Callable[[str, BaseException], None] | None = None,
) -> dict[str, Samples]:
    """Run every case once per round, ``repeats`` rounds, rotating the order each round.

    A case returns its measured seconds. A case that raises is not run again; ``on_failure``
    (e.g. restart the workers) is called so the other cases start clean.
    """
    samples = {name: Samples() for name in cases}
    names = list(cases)
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            if samples[name].failure is not None:
                continue
            try:
                samples[name].values.append(cases[name]())
            except Exception as exc:  # noqa: BLE001 - a timed-out or failed case is reported, not fatal
                samples[name].failure = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
                console.print(f"[yellow]{name}: {samples[name].failure}[/yellow]")
                if on_failure is not None:
                    on_failure(name, exc)
            else:
                console.print(f"  {name}: {samples[name].values[-1]:.3f} s", style="dim")
    return samples


# --- reporting --------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU model name (from /proc/cpuinfo where there is one)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE)
        if match:
            return match.group(1).strip()
    return platform.processor() or platform.machine()


def machine_lines(specs: Sequence[WorkerSpec], broker: str = REDIS_URL) -> list[str]:
    """Where and how a benchmark ran: one markdown bullet per fact."""
    workers = "; ".join(f"{count}× ({spec.describe()})" for spec, count in _count(specs))
    return [
        f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- CPU: {cpu_model()}, {os.cpu_count()} cores (shared with other jobs: numbers are noisy)",
        (f"- Python {platform.python_version()}, Celery {celery.__version__}, broker + result backend: "
         f"Redis ({_redact(broker)})"),
        f"- workers: {workers}",
        f"- load average (1/5/15 min) when written: {' / '.join(f'{load:.1f}' for load in os.getloadavg())}",
    ]


def _count(specs: Sequence[WorkerSpec]) -> list[tuple[WorkerSpec, int]]:
    counts: dict[WorkerSpec, int] = {}
    for spec in specs:
        counts[spec] = counts.get(spec, 0) + 1
    return list(counts.items())


def _redact(url: str) -> str:
    return re.sub(r"//[^@/]*@", "//", url)


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """The table on the terminal."""
    table = Table(title=title, show_lines=False)
    for index, header in enumerate(headers):
        table.add_column(header, justify="left" if index < 2 else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """The same table as GitHub markdown."""
    lines = ["| " + " | ".join(headers) + " |",
             "| " + " | ".join("---" if i < 2 else "---:" for i in range(len(headers))) + " |"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(heading: str, body: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace the ``## heading`` section of ``path`` (up to the next ``## ``), or append it."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = f"## {heading}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(heading)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def fmt(value: float | None, digits: int = 2) -> str:
    """A number for a table cell, or an em dash."""
    return "—" if value is None else f"{value:.{digits}f}"


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return None if numerator is None or not denominator else numerator / denominator


def list_schedule_s(children: Mapping[str, Sequence[str]], ms: Mapping[str, float],
                    priority: Mapping[str, float], slots: int) -> float:
    """Makespan (s) of greedy list scheduling with zero overhead: whenever one of ``slots`` is free, start
    the ready task of highest ``priority`` (what ``dag`` does, minus its latency). ``children`` lists every
    task; ``ms`` is each task's duration."""
    left = dict.fromkeys(children, 0)
    for kids in children.values():
        for child in kids:
            left[child] += 1
    ready = [(-priority[name], name) for name, count in left.items() if count == 0]
    heapq.heapify(ready)
    running: list[tuple[float, str]] = []
    now = 0.0
    while ready or running:
        while ready and len(running) < slots:
            name = heapq.heappop(ready)[1]
            heapq.heappush(running, (now + ms[name] / 1000, name))
        now, done = heapq.heappop(running)
        for child in children[done]:
            left[child] -= 1
            if left[child] == 0:
                heapq.heappush(ready, (-priority[child], child))
    return now
