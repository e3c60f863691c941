"""Live progress of ``run`` in a terminal: per-module state, counts, elapsed time and ETA.

The display polls the state store (``ExecutionHandle.records()``) while the main thread waits for
the result. ETA needs expected module durations: a *duration source* (e.g. execution history)
registered with :func:`register_duration_source` (execution history registers one in
``cli/history.py``: the saved profile, else medians of recent runs); without durations, no ETA.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from dspex_celery.client import ExecutionHandle
from dspex_celery.plan import Plan
from dspex_celery.results import (
    ExecutionResult,
    ModuleRecord,
    ModuleStatus,
    parse_time,
    utcnow,
)
from dspex_celery.runtime import Runtime

log = logging.getLogger(__name__)

#: Display states, in display order, with their styles.
STATES = {
    "pending": "dim",
    "waiting": "magenta",
    "running": "cyan",
    "retrying": "yellow",
    "done": "green",
    "failed": "red",
    "skipped": "yellow",
    "cancelled": "magenta",
}
ACTIVE = ("waiting", "running", "retrying")
POLL_S = 0.25

DurationSource = Callable[[Runtime, Plan], Mapping[str, float] | None]
_duration_sources: list[DurationSource] = []


def register_duration_source(source: DurationSource) -> None:
    """Add a source of expected seconds per module (used for the ETA)."""
    _duration_sources.append(source)


def expected_durations(runtime: Runtime, plan: Plan) -> dict[str, float] | None:
    """Expected seconds per module from the first source that knows this program, else None."""
    for source in _duration_sources:
        try:
            durations = source(runtime, plan)
        except Exception:  # an ETA is a nicety: never let it break a run
            log.warning("duration source %r failed", source, exc_info=True)
            continue
        if durations:
            return dict(durations)
    return None


def module_state(record: ModuleRecord | None) -> str:
    if record is None:
        return "pending"
    if record.status is ModuleStatus.RUNNING and record.waiting_for:
        return "waiting"
    return "done" if record.status is ModuleStatus.SUCCEEDED else record.status.value


def eta_seconds(plan: Plan, records: Mapping[str, ModuleRecord], durations: Mapping[str, float],
                now: datetime) -> float:
    """Seconds left along the longest chain of unfinished modules (infinite workers assumed)."""
    fallback = sum(durations.values()) / len(durations)
    finish: dict[str, float] = {}
    for name in plan.topological_order():
        record = records.get(name)
        if record is not None and record.status.final:
            finish[name] = 0.0
            continue
        running = record is not None and record.status is ModuleStatus.RUNNING and record.started_at
        elapsed = (now - parse_time(record.started_at)).total_seconds() if running else 0.0  # type: ignore[union-attr,arg-type]
        own = max(durations.get(name, fallback) - elapsed, 0.0)
        finish[name] = max((finish[parent] for parent in plan.modules[name].parents), default=0.0) + own
    return max(finish.values(), default=0.0)


class ProgressView:
    """What the live display shows; rendering polls the store at most every ``POLL_S``."""

    def __init__(self, handle: ExecutionHandle, plan: Plan, durations: Mapping[str, float] | None,
                 console: Console) -> None:
        self.handle = handle
        self.plan = plan
        self.durations = durations
        self.console = console
        self.started = time.monotonic()
        self.records: dict[str, ModuleRecord] = {}
        self.polled = 0.0
        self.lock = threading.Lock()

    def poll(self) -> None:
        with self.lock:
            if time.monotonic() - self.polled < POLL_S:
                return
            self.polled = time.monotonic()
        try:
            self.records = self.handle.records()
        except Exception:  # a store hiccup: keep showing the last state
            log.debug("progress poll failed", exc_info=True)

    def render(self) -> RenderableType:
        self.poll()
        states = {name: module_state(self.records.get(name)) for name in self.plan.modules}
        return Group(self._header(states), self._table(states))

    def _header(self, states: dict[str, str]) -> RenderableType:
        total = len(states)
        finished = sum(state in ("done", "failed", "skipped", "cancelled") for state in states.values())
        counts = Text(f"{self.plan.program} {self.handle.execution_id}  {finished}/{total} finished  ")
        for state, style in STATES.items():
            count = sum(value == state for value in states.values())
            if count:
                counts.append(f"{count} {state}  ", style=style)
        counts.append(f"elapsed {time.monotonic() - self.started:.1f}s")
        if self.durations:
            counts.append(f"  ETA ~{eta_seconds(self.plan, self.records, self.durations, utcnow()):.0f}s")
        header = Table.grid()
        header.add_row(counts)
        header.add_row(ProgressBar(total=total, completed=finished, width=min(60, self.console.width)))
        return header

    def _table(self, states: dict[str, str]) -> RenderableType:
        room = max(self.console.height - 5, 5)
        order = sorted(self.plan.modules, key=lambda name: _rank(states[name]))
        shown = order if len(order) <= room else order[: room - 1]
        table = Table(show_edge=False, box=None, pad_edge=False)
        for column in ("module", "state", "attempt", "seconds", "worker"):
            table.add_column(column)
        now = utcnow()
        for name in shown:
            record = self.records.get(name) or ModuleRecord()
            state = states[name]
            table.add_row(name, Text(state, style=STATES[state]), str(record.attempts or ""),
                          _seconds(record, now), record.worker or "")
        if len(shown) < len(order):
            table.add_row(Text(f"... {len(order) - len(shown)} more", style="dim"), "", "", "", "")
        return table


def _rank(state: str) -> int:
    """Active modules first, then failures, then the rest in state order."""
    order = [*ACTIVE, "failed", "pending", "skipped", "cancelled", "done"]
    return order.index(state)


def _seconds(record: ModuleRecord, now: datetime) -> str:
    if record.duration_s is not None and record.status.final:
        return f"{record.duration_s:.2f}"
    if record.started_at and record.status is ModuleStatus.RUNNING:
        return f"{(now - parse_time(record.started_at)).total_seconds():.1f}"
    return ""


def show_progress(as_json: bool, quiet: bool) -> bool:
    """A live display only for a person at a terminal: not with --json or --quiet, not piped."""
    return not as_json and not quiet and sys.stdout.isatty()


def follow(handle: ExecutionHandle, console: Console | None = None,
           durations: Mapping[str, float] | None = None) -> ExecutionResult:
    """Wait for the result (as ``handle.get()``) while a live display shows progress."""
    console = console or Console()
    plan = handle.runtime.store.plan(handle.execution_id)
    if plan is None:  # expired already: nothing to show
        return handle.get()
    if durations is None:
        durations = expected_durations(handle.runtime, plan)
    view = ProgressView(handle, plan, durations, console)
    with Live(get_renderable=view.render, console=console, refresh_per_second=4, transient=True):
        return handle.get()


def wait_and_report(handle: ExecutionHandle, as_json: bool, quiet: bool) -> None:
    """Wait for the execution (with live progress on a terminal), print it, exit 0 or 1."""
    from dspex_celery.cli.render import print_json, print_result

    result = follow(handle) if show_progress(as_json, quiet) else handle.get()
    if as_json:
        print_json(result.to_json_dict())
    else:
        print_result(result)
    raise SystemExit(0 if result.succeeded else 1)
