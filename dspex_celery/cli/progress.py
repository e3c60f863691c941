"""Live progress of ``run`` in a terminal: per-module state, counts, elapsed time and ETA.

The display polls the state store (``ExecutionHandle.records()``) while the main thread waits for
the result. ETA needs expected module durations from a *duration source*: execution history (the
saved profile, else medians of recent runs), then any added with :func:`register_duration_source`;
without durations, no ETA.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from types import FrameType
from typing import NoReturn

import click
import redis

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from dspex_celery.cli.render import print_json, print_result
from dspex_celery.client import ENDED_WAIT_S, ExecutionHandle, cancel_execution
from dspex_celery.errors import DspexError, StateLost, StateStoreUnreachable
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


def history_durations(runtime: Runtime, plan: Plan) -> Mapping[str, float] | None:
    """Expected seconds per module from execution history (the saved profile, else recent runs)."""
    from dspex_celery.optimizer import expected_durations as profile_durations  # SQLAlchemy: only on a terminal

    return profile_durations(runtime.settings, plan)


_duration_sources: list[DurationSource] = [history_durations]


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

    def learn_durations(self, runtime: Runtime) -> None:
        """Look up the expected seconds per module (for the ETA; shown from the next frame on)."""
        self.durations = expected_durations(runtime, self.plan)

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
    """Wait for the result (as ``handle.get(propagate=False)``) while a live display shows progress."""
    console = console or Console()
    plan = handle.runtime.store.plan(handle.execution_id)
    if plan is None:  # expired already: nothing to show
        return handle.get(propagate=False)
    view = ProgressView(handle, plan, durations, console)
    if durations is None:  # history is slow to open (SQLAlchemy, a query): the display starts without an ETA
        threading.Thread(target=view.learn_durations, args=(handle.runtime,), name="dspex-eta", daemon=True).start()
    with Live(get_renderable=view.render, console=console, refresh_per_second=4, transient=True):
        return handle.get(propagate=False)


def submit_and_report(start: Callable[[], ExecutionHandle], as_json: bool, quiet: bool,
                      detach: bool = False) -> NoReturn:
    """Submit with ``start`` (a Ctrl-C meanwhile is held until the execution exists), then
    :func:`report_detached` or :func:`wait_and_report`."""
    with held_interrupt() as interrupted:
        handle = start()
    if interrupted:
        cancel_and_exit(handle, as_json)
    if detach:
        report_detached(handle, as_json)
    wait_and_report(handle, as_json, quiet)


def report_detached(handle: ExecutionHandle, as_json: bool) -> NoReturn:
    """``--detach``: print the execution id (``--json``: an object with it) and exit 0."""
    if as_json:
        print_json({"execution_id": handle.execution_id})
    else:
        click.echo(handle.execution_id)
    raise SystemExit(0)


def wait_and_report(handle: ExecutionHandle, as_json: bool, quiet: bool) -> NoReturn:
    """Wait for the execution (with live progress on a terminal), print it, exit 0 or 1.

    Ctrl-C cancels it (exit 130); state lost from the store, or a store that stopped answering,
    is one line (``--json``: one object too) and exit 1.
    """
    try:
        result = follow(handle) if show_progress(as_json, quiet) else handle.get(propagate=False)
    except KeyboardInterrupt:
        cancel_and_exit(handle, as_json)
    except (StateLost, StateStoreUnreachable) as exc:
        if as_json:
            print_json(exc.to_json_dict())
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(exc.exit_code) from None
    if as_json:
        print_json(result.to_json_dict())
    else:
        print_result(result)
    raise SystemExit(0 if result.succeeded else 1)


# --- Ctrl-C ---------------------------------------------------------------------------------------

#: The exit status of a command ended by Ctrl-C (128 + SIGINT), as a shell reports it.
INTERRUPTED = 128 + signal.SIGINT


@contextlib.contextmanager
def held_interrupt() -> Iterator[list[int]]:
    """Hold a Ctrl-C until the block ends (the yielded list is then non-empty); a second one leaves."""
    received: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        if received:
            leave_now(signum, frame)
        received.append(signum)
        click.echo("interrupted: cancelling once the execution is submitted (Ctrl-C again to leave now)",
                   err=True)

    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield received
    finally:
        signal.signal(signal.SIGINT, previous)


def cancel_and_exit(handle: ExecutionHandle, as_json: bool) -> NoReturn:
    """After Ctrl-C: cancel the execution as ``dspex-celery cancel`` would and exit 130.

    A second Ctrl-C meanwhile leaves at once. ``--json`` prints the cancelled result.
    """
    signal.signal(signal.SIGINT, leave_now)
    execution_id = handle.execution_id
    if handle.runtime.settings.embedded:
        from dspex_celery.embedded import abandon_running_calls  # only embedded runs load it

        abandon_running_calls()  # the running call's outcome is ignored: the exit does not wait for it
    try:
        if not cancel_execution(handle.runtime, execution_id):
            click.echo(f"execution {execution_id} had already ended: not cancelled", err=True)
        else:
            click.echo(f"cancelled execution {execution_id}", err=True)
        if as_json:
            print_json(handle.get(timeout=ENDED_WAIT_S, propagate=False).to_json_dict())
    except (DspexError, redis.RedisError) as exc:
        click.echo(f"error: could not cancel execution {execution_id} ({exc}): "
                   f"run dspex-celery cancel {execution_id}", err=True)
    raise SystemExit(INTERRUPTED)


def leave_now(signum: int, frame: FrameType | None) -> None:
    """A second Ctrl-C: leave without waiting for anything."""
    sys.stderr.write("interrupted again: leaving now\n")
    sys.stderr.flush()
    os._exit(INTERRUPTED)
