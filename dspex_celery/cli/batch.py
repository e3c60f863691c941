"""``run PROGRAM --inputs-file data.jsonl --output results.jsonl``: one execution per input line.

While it runs, every submission and result is appended to ``OUTPUT.partial`` (a journal); at the
end the output is written in input order and the journal removed. Running the same command again
reuses the lines this same program version succeeded on with the same input, waits for executions
an interrupted run left running, and runs only the other lines (``--fresh``: all of them). Ctrl-C
cancels the executions in flight, journals them and exits 130; a second Ctrl-C leaves at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any, NoReturn

import click
import redis
import rich.progress
from click.core import ParameterSource
from rich.console import Console

from dspex_celery.batch import (
    CANCELLED,
    DEFAULT_MAX_IN_FLIGHT,
    FAILED,
    INVALID,
    SUCCEEDED,
    BatchItem,
    BatchLine,
    BatchResult,
    BatchRun,
    line_key,
    make_item,
    resolve_metric,
    submit_batch,
)
from dspex_celery.cli.distribute import is_module_reference, run_module_batch
from dspex_celery.cli.inputs import check_output, collect_inputs
from dspex_celery.cli.options import open_runtime, refuse_modules_on_a_cluster
from dspex_celery.cli.progress import INTERRUPTED
from dspex_celery.errors import DspexError, InputError, UsageError, beyond_parser_limits, not_utf8
from dspex_celery.plan import Plan
from dspex_celery.program import Program

BATCH_PARAMS = ("batch_file", "output", "max_in_flight", "metric", "fresh")
#: The journal's first record after ``--fresh``: the output file's lines are not reused on a resume.
FRESH_MARK = {"fresh": True}
#: ``run`` parameters a batch uses; any other one given on the command line is refused.
SHARED_PARAMS = ("program_file", "pairs", "inputs_file", "broker", "result_backend", "strategy", "timeout", "as_json",
                 "no_profile", "learned_timeouts", "modules")
ACCEPTED_PARAMS = (*SHARED_PARAMS, "quiet")


def batch_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give ``run`` the batch options; with ``--inputs-file`` it runs :func:`run_batch` instead."""

    @functools.wraps(command)
    def run_or_batch(**kwargs: Any) -> Any:
        batch = {name: kwargs.pop(name) for name in BATCH_PARAMS}
        if batch["batch_file"] is None:
            given = [name for name in BATCH_PARAMS if _given(name)]
            if given:
                raise UsageError(f"--{given[0].replace('_', '-')} needs --inputs-file FILE.jsonl")
            return command(**kwargs)
        if is_module_reference(kwargs["program_file"]):  # pkg.mod:MyModule: dspex_celery/cli/distribute.py
            return run_module_batch(kwargs["program_file"], batch_file=batch["batch_file"], output=batch["output"],
                                    max_in_flight=batch["max_in_flight"], broker=kwargs["broker"],
                                    result_backend=kwargs["result_backend"], lm=kwargs.get("lm"),
                                    adapter=kwargs.get("adapter"), with_pairs=kwargs.get("with_pairs", ()),
                                    as_json_flag=kwargs["as_json"], metric=batch["metric"])
        refused = [name for name in kwargs if name not in ACCEPTED_PARAMS and _given(name)]
        if refused:
            raise UsageError(f"--{refused[0].replace('_', '-')} cannot be combined with --inputs-file")
        return run_batch(**batch, **{name: kwargs[name] for name in SHARED_PARAMS}, quiet=kwargs.get("quiet", False))

    options = [
        click.option("--inputs-file", "batch_file", metavar="FILE.jsonl", default=None,
                     help="Batch: one execution per JSON line (keys that are not program inputs are labels)."),
        click.option("--output", "output", metavar="FILE.jsonl", default=None,
                     help="Batch results, one line per input in input order (default: INPUTS.results.jsonl)."),
        click.option("--max-in-flight", type=click.IntRange(min=1), default=None,
                     help=f"Batch: executions submitted and unfinished at once (default {DEFAULT_MAX_IN_FLIGHT})."),
        click.option("--metric", metavar="PKG.MOD:FN", default=None,
                     help="Batch: score each output with FN(example, prediction) and print the mean."),
        click.option("--fresh", is_flag=True, default=False,
                     help="Batch: run every line again (default: reuse the lines this program version "
                          "already succeeded on with the same input)."),
    ]
    for option in reversed(options):
        run_or_batch = option(run_or_batch)
    params = run_or_batch.__click_params__  # type: ignore[attr-defined]
    run_or_batch.__click_params__ = params[-len(options):] + params[:-len(options)]  # type: ignore[attr-defined]
    return run_or_batch  # (click lists the params in reverse: the batch options come last in --help)


def _given(name: str) -> bool:
    return click.get_current_context().get_parameter_source(name) not in (None, ParameterSource.DEFAULT)


def run_batch(
    *,
    batch_file: str,
    output: str | None,
    max_in_flight: int | None,
    metric: str | None,
    fresh: bool,
    program_file: str,
    pairs: tuple[str, ...],
    inputs_file: str | None,
    broker: str | None,
    result_backend: str | None,
    strategy: str | None,
    timeout: float | None,
    as_json: bool,
    no_profile: bool = False,
    learned_timeouts: bool | None = None,
    modules: tuple[str, ...] = (),
    quiet: bool = False,
) -> None:
    """Run PROGRAM once per line of ``batch_file``; exit 0 when every line succeeded, else 1."""
    program = Program.from_file(program_file)
    plan = program.plan()
    base = collect_inputs(pairs, inputs_file)
    source = Path(batch_file)
    target = Path(output) if output else source.with_name(f"{source.stem}.results.jsonl")
    check_output(target, ("--inputs-file", source), ("--inputs", inputs_file), ("program", program_file))
    journal = target.with_name(target.name + ".partial")
    metric_fn = resolve_metric(metric) if metric else None
    total = count_lines(source)
    runtime = open_runtime(broker, result_backend, modules=modules,
                           check=refuse_modules_on_a_cluster if modules else None)
    previous = [] if fresh else read_previous(target, journal)
    done: dict[int, BatchLine] = {}
    with open_journal(journal, fresh) as log, SecondInterruptLeaves(), \
            dropped_if_unused(journal):
        if fresh:
            log.write(json.dumps(FRESH_MARK) + "\n")
        run = submit_batch(
            program, read_items(source, plan, base), app=runtime.app, strategy=strategy, timeout=timeout,
            max_in_flight=max_in_flight or DEFAULT_MAX_IN_FLIGHT, metric=metric_fn, previous=previous,
            fresh=fresh, on_submit=lambda line: append_line(log, line), use_profile=not no_profile,
            learned_timeouts=learned_timeouts,
        )
        progress = BatchProgress(total, run, enabled=sys.stderr.isatty() and not quiet)
        try:
            collect(run.as_completed(), log, progress, done)
        except KeyboardInterrupt:
            progress.close()
            interrupted(run, log, done, total)
    result = run.result(done.values())
    write_output(target, result.lines)
    journal.unlink(missing_ok=True)
    report(program.name, target, result, as_json)
    raise SystemExit(0 if result.count(SUCCEEDED) == len(result.lines) else 1)


@contextlib.contextmanager
def dropped_if_unused(journal: Path) -> Iterator[None]:
    """A journal this run created is removed when an error stops the run before any line was journaled
    (an invalid program, a refused module): a failed command leaves no file behind."""
    created = not journal.exists() or journal.stat().st_size == 0
    try:
        yield
    except DspexError:
        if created and not any(json.loads(text) != FRESH_MARK for text in _lines_of(journal)):
            journal.unlink(missing_ok=True)
        raise


def _lines_of(path: Path) -> list[str]:
    return [text for text in path.read_text(encoding="utf-8").splitlines() if text.strip()] if path.exists() else []


def collect(lines: Iterator[BatchLine], log: IO[str], progress: BatchProgress, done: dict[int, BatchLine]) -> None:
    """Every finished line into ``done``, journaled as it comes."""
    for line in lines:
        done[line.index] = line
        if not line.reused:
            append_line(log, line)
        progress.update(done)
    progress.close()


def interrupted(run: BatchRun, log: IO[str], done: dict[int, BatchLine], total: int) -> NoReturn:
    """Ctrl-C: cancel the executions in flight, journal their lines, say how to resume, exit 130."""
    in_flight = run.open_lines
    if run.runtime.settings.embedded:
        from dspex_celery.embedded import abandon_running_calls  # only embedded runs load it

        abandon_running_calls()  # the running calls' outcomes are ignored: the exit does not wait for them
    click.echo(f"interrupted: cancelling {in_flight} line{_s(in_flight)} in flight "
               "(Ctrl-C again to leave at once)", err=True)
    try:
        ended = run.cancel()
    except redis.RedisError as exc:
        click.echo(f"error: cannot cancel the lines in flight ({exc}): a re-run of the same command "
                   "re-attaches to them", err=True)
        raise SystemExit(INTERRUPTED) from None
    for line in ended:
        done[line.index] = line
        append_line(log, line)
    cancelled = sum(line.status == CANCELLED for line in ended)
    click.echo(
        f"cancelled {cancelled} running line{_s(cancelled)}; {len(done) - cancelled} of {total} lines done, "
        f"{total - len(done)} not run: re-run the same command to resume (lines done are reused)", err=True,
    )
    raise SystemExit(INTERRUPTED)


class SecondInterruptLeaves:
    """While a batch runs: the first Ctrl-C raises KeyboardInterrupt (the batch then cancels what it
    started); a second one leaves at once, exit 130 (the journal is flushed line by line, so a re-run
    re-attaches to whatever still runs)."""

    def __init__(self) -> None:
        self.interrupts = 0
        self.previous: Any = None

    def __enter__(self) -> SecondInterruptLeaves:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._on_interrupt)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    def _on_interrupt(self, signum: int, frame: FrameType | None) -> None:
        self.interrupts += 1
        if self.interrupts == 1:
            raise KeyboardInterrupt
        os.write(2, b"\ninterrupted again: left at once; executions not cancelled yet go on and a re-run of "
                    b"the same command re-attaches to them\n")
        os._exit(INTERRUPTED)


def _s(count: int) -> str:
    return "" if count == 1 else "s"


# --- files ----------------------------------------------------------------------------------------


def open_journal(journal: Path, fresh: bool) -> IO[str]:
    """The journal, opened to append (``--fresh``: emptied) and locked for this run: the same batch
    started again while it runs (another terminal, a cron job) is refused, instead of submitting the
    lines this one has not journaled yet a second time. A path that cannot be written is one line too."""
    try:
        log = journal.open("a", encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot write {journal} ({exc.strerror}): pick another --output") from None
    try:
        fcntl.flock(log.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log.close()
        raise UsageError(f"another batch is running into {journal.with_suffix('')} (its journal {journal} is "
                         "locked): wait for it to end, or pick another --output") from None
    if fresh:
        log.truncate(0)
    return log


def count_lines(path: Path) -> int:
    """Non-blank lines of the inputs file (the batch's size, for progress)."""
    try:
        with path.open(encoding="utf-8") as file:
            return sum(1 for text in file if text.strip())
    except FileNotFoundError:
        raise InputError(f"inputs file {path} not found: check the path") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"inputs file {path} is {not_utf8(exc)}: save it as UTF-8 JSON lines") from None
    except OSError as exc:
        raise InputError(f"cannot read inputs file {path} ({exc.strerror}): name a JSON Lines file (one JSON object per line)") from None


def read_items(path: Path, plan: Plan, base: dict[str, Any]) -> Iterator[BatchItem]:
    """One item per non-blank line; a line that is not a JSON object becomes an invalid item."""
    index = 0
    with path.open(encoding="utf-8") as file:
        for number, text in enumerate(file, start=1):
            if not text.strip():
                continue
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                yield BatchItem(index, {}, {}, line_key({"text": text}), f"line {number}: invalid JSON ({exc.msg})")
            except (RecursionError, ValueError) as exc:
                if (problem := beyond_parser_limits(exc)) is None:
                    raise
                yield BatchItem(index, {}, {}, line_key({"text": text}), f"line {number} {problem}")
            else:
                yield make_item(index, data, plan, base, line=number)
            index += 1


def read_previous(output: Path, journal: Path) -> list[BatchLine]:
    """Lines of earlier runs, oldest first: the output file, then the journal (only the journal's
    records after its ``--fresh`` mark when it has one)."""
    journaled: list[BatchLine] = []
    fresh = False
    for record in _read_records(journal):
        if record == FRESH_MARK:
            journaled, fresh = [], True
        elif (line := BatchLine.from_json(record)) is not None:
            journaled.append(line)
    if fresh:
        return journaled
    return [line for record in _read_records(output) if (line := BatchLine.from_json(record)) is not None] + journaled


def _read_records(path: Path) -> Iterator[Any]:
    if not path.exists():
        return
    with path.open(encoding="utf-8") as file:
        for text in file:
            try:
                yield json.loads(text)
            except json.JSONDecodeError:
                continue  # e.g. the last line of a journal cut by a kill


def append_line(log: IO[str], line: BatchLine) -> None:
    log.write(json.dumps(line.to_json(), ensure_ascii=False) + "\n")
    log.flush()


def write_output(path: Path, lines: list[BatchLine]) -> None:
    """The output file, one line per input in input order, replaced atomically."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with partial.open("w", encoding="utf-8") as file:
        for line in lines:
            file.write(json.dumps(line.to_json(), ensure_ascii=False) + "\n")
    partial.replace(path)


# --- terminal -------------------------------------------------------------------------------------


class BatchProgress:
    """The batch's status line on stderr while it runs, only on a terminal (rich.progress): lines
    done of the total, failed, in flight, lines run per second, the ETA and, with ``--metric``, the
    running mean score of the lines done (failed ones score 0, as ``dspy.Evaluate`` counts them)."""

    LINE = ("batch {task.completed:.0f}/{task.total:.0f} · {task.fields[failed]} failed · "
            "{task.fields[in_flight]} in flight · {task.fields[rate]:.1f} lines/s · ETA")
    METRIC = "· metric {task.fields[metric]}"

    def __init__(self, total: int, run: BatchRun, *, enabled: bool) -> None:
        self.total = total
        self.run = run
        self.started = time.monotonic()
        metric = [rich.progress.TextColumn(self.METRIC, markup=False)] if run.metric is not None else []
        self.display = rich.progress.Progress(
            rich.progress.TextColumn(self.LINE, markup=False), rich.progress.TimeRemainingColumn(compact=True), *metric,
            console=Console(stderr=True), transient=True, disable=not enabled,
            redirect_stdout=False, redirect_stderr=False,
        )
        self.task = self.display.add_task("batch", total=total, failed=0, in_flight=0, rate=0.0, metric="-")
        self.display.start()

    def update(self, done: dict[int, BatchLine]) -> None:
        rate = (self.run.ran + self.run.reattached) / max(time.monotonic() - self.started, 1e-9)
        self.display.update(self.task, completed=len(done), failed=sum(not line.succeeded for line in done.values()),
                            in_flight=self.run.in_flight, rate=rate, metric=running_mean(done),
                            refresh=len(done) == self.total)

    def close(self) -> None:
        """Take the line off the terminal (a second call does nothing)."""
        self.display.stop()


def running_mean(done: dict[int, BatchLine]) -> str:
    """The mean metric score of the lines done so far, in percent (``77.8%``)."""
    if not done:
        return "-"
    return f"{100 * sum(line.score or 0.0 for line in done.values()) / len(done):.1f}%"


def report(program: str, output: Path, result: BatchResult, as_json: bool) -> None:
    """The batch summary: one JSON object, or two or three readable lines."""
    if as_json:
        click.echo(json.dumps({"program": program, "output": str(output), **result.summary()}, indent=2))
        return
    cancelled = f", {result.count(CANCELLED)} cancelled" if result.count(CANCELLED) else ""
    click.echo(
        f"{program}: {len(result.lines)} lines -> {output}: {result.count(SUCCEEDED)} succeeded, "
        f"{result.count(FAILED)} failed, {result.count(INVALID)} invalid{cancelled} (ran {result.ran}, "
        f"re-attached {result.reattached}, reused {result.reused}) in {result.elapsed_s:.2f} s"
    )
    click.echo(result.explain())
    if not result.usage.empty:
        click.echo(f"LM usage of the lines that ran: {result.usage.describe()}")
    if result.metric is not None:
        click.echo(f"Average Metric: {result.metric_total:.2f} / {len(result.lines)} ({result.score:.1f}%)")
    unfinished = len(result.lines) - result.count(SUCCEEDED)
    if unfinished:
        click.echo(f"{unfinished} lines did not succeed: fix the cause and re-run the same command to retry them")
