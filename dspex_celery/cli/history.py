"""``listener``, ``history``, ``show``, ``optimize`` and ``status``: execution history and the live cluster."""

from __future__ import annotations

import logging
import signal
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from dspex_celery.cli.options import cluster_runtime, connection_options
from dspex_celery.cli.render import fitted_table, print_json, print_result
from dspex_celery.errors import ConfigError, UsageError
from dspex_celery.history.models import AttemptRow, ExecutionRow
from dspex_celery.history.store import (
    HistoryStore,
    history_url,
    latest_records,
    open_history,
    optional_iso,
)
from dspex_celery.optimizer import Report, optimize
from dspex_celery.presence import live_workers
from dspex_celery.results import isoformat, utcnow
from dspex_celery.routing import CONTROL, queue_name
from dspex_celery.runtime import Runtime
from dspex_celery.settings import Settings, load_settings
from dspex_celery.spec import load_program_file
from dspex_celery.usage import Usage, cost_text, total_usage


def history_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--history-url", "history_db", metavar="URL", default=None,
        help="History database (default: DSPEX_HISTORY_URL, else a SQLite file in the user data directory).",
    )(command)


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


def open_store(settings: Settings, *, create: bool = False) -> HistoryStore:
    url = history_url(settings)
    if url is None:
        raise ConfigError("history is off (DSPEX_HISTORY_URL=off): set DSPEX_HISTORY_URL or pass --history-url URL")
    return open_history(url, create=create)


# --- listener ------------------------------------------------------------------------------------


@click.command()
@connection_options
@history_option
@click.option("--consumer", default=None, help="Consumer name in the stream's group (default: listener@HOST).")
@click.option("--group", default="history", show_default=True,
              help="Consumer group: one per history database (listeners of one database share it).")
def listener(
    broker: str | None, result_backend: str | None, history_db: str | None, consumer: str | None, group: str
) -> None:
    """Write execution history from the cluster's history stream (restart-safe, idempotent)."""
    from dspex_celery.history import listener as listener_module
    from dspex_celery.history.listener import Listener

    logging.getLogger(listener_module.__name__).setLevel(logging.INFO)  # its recoveries too, not only warnings

    settings = load_settings(broker_url=broker, result_backend=result_backend, history_url=history_db)
    runtime = cluster_runtime(broker, result_backend, "the listener")
    store = open_store(settings, create=True)
    worker = Listener(runtime, store, consumer, group=group)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    reconciled = worker.start()
    click.echo(
        f"listener ready: namespace {settings.namespace}, consumer {worker.consumer}, history {store.display_url}, "
        f"reconciled {reconciled} execution(s)",
        err=True,
    )
    worker.run(stop)


# --- history and show ---------------------------------------------------------------------------


@click.command("history")
@click.option("--program", default=None, help="Only executions of this program.")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True,
              help="How many executions to list.")
@click.option("--json", "as_json", is_flag=True, help="Print the executions as one JSON list.")
@history_option
def history_command(program: str | None, limit: int, as_json: bool, history_db: str | None) -> None:
    """List recorded executions, most recent first."""
    store = open_store(load_settings(history_url=history_db))
    rows = store.executions(program, limit)
    usage = execution_usage(store, [row.id for row in rows])
    summaries = [{**execution_summary(row), "usage": usage[row.id].to_json_dict()} for row in rows]
    if as_json:
        print_json(summaries)
        return
    table_rows = []
    for item in summaries:
        seconds = f"{item['duration_s']:.3f}" if item["duration_s"] is not None else "-"
        submitted = (item["submitted_at"] or "-")[:19].replace("T", " ")
        spent = usage[item["execution_id"]]
        table_rows.append([item["execution_id"], item["program"] or "?", item["status"], submitted, seconds,
                           str(spent.tokens), cost_text(spent.cost), ", ".join(item["failed_modules"])])
    console = Console(highlight=False)
    console.print(history_table(table_rows, console.width))


HISTORY_COLUMNS = ("execution", "program", "status", "submitted", "seconds", "tokens", "cost", "failed")


def history_table(rows: list[list[str]], width: int) -> Table:
    """``history``'s rows within ``width`` columns (ids whole; the rightmost columns give way)."""
    return fitted_table(HISTORY_COLUMNS, rows, width, ids=("execution",))


def execution_usage(store: HistoryStore, execution_ids: list[str]) -> dict[str, Usage]:
    """LM usage per execution: the sum of its modules' latest records (each sums its attempts)."""
    rows: dict[str, list[AttemptRow]] = {execution_id: [] for execution_id in execution_ids}
    for row in store.attempts(execution_ids) if execution_ids else ():
        rows[row.execution_id].append(row)
    return {execution_id: total_usage(latest_records(attempts).values()) for execution_id, attempts in rows.items()}


def execution_summary(row: ExecutionRow) -> dict[str, Any]:
    """One execution as ``history --json`` prints it."""
    return {
        "execution_id": row.id,
        "program": row.program,
        "fingerprint": row.fingerprint,
        "strategy": row.strategy,
        "status": row.status,
        "submitted_at": optional_iso(row.submitted_at),
        "started_at": optional_iso(row.started_at),
        "finished_at": optional_iso(row.finished_at),
        "duration_s": _seconds(row.submitted_at, row.finished_at),
        "failed_modules": row.failed_modules or [],
        "error": row.error,
        "resumed_from": row.resumed_from,
    }


@click.command()
@click.argument("execution_id")
@click.option("--json", "as_json", is_flag=True, help="Print the same JSON object as run --json.")
@history_option
def show(execution_id: str, as_json: bool, history_db: str | None) -> None:
    """Show a recorded execution: status, outputs and one row per module (--json: as run --json)."""
    result = open_store(load_settings(history_url=history_db)).result(execution_id)
    if as_json:
        print_json(result.to_json_dict())
    else:
        print_result(result)


# --- optimize -----------------------------------------------------------------------------------


@click.command("optimize")
@click.argument("program")
@click.option("--fingerprint", default=None, help="Program version to analyse (default: the latest run).")
@click.option("--dry-run", is_flag=True, help="Show the profile that would be saved; keep the stored one.")
@json_option
@history_option
def optimize_command(program: str, fingerprint: str | None, dry_run: bool, as_json: bool, history_db: str | None) -> None:
    """Analyse PROGRAM's history; save the profile its next runs use."""
    name = program_name(program)
    report = optimize(open_store(load_settings(history_url=history_db)), name, fingerprint, save=not dry_run)
    if as_json:
        print_json(report.to_json_dict())
    else:
        print_report(report)


def program_name(program: str) -> str:
    """``optimize`` takes a program's name; given its file (``examples/rag.yaml``), the name that file gives."""
    path = Path(program)
    looks_like_a_file = path.suffix.lower() in (".yaml", ".yml", ".json") or "/" in program
    if looks_like_a_file and not path.is_file():
        what = "is a directory" if path.is_dir() else "not found"
        raise UsageError(f"program file {program} {what}: name a program file, or the program's name")
    if not looks_like_a_file:
        return program
    name = load_program_file(path).get("name")
    return name if isinstance(name, str) else program


def print_report(report: Report) -> None:
    console = Console(highlight=False)
    console.print(f"[bold]{report.program}[/bold] {report.fingerprint}: {report.executions} finished execution(s)")
    table = Table(show_edge=False, box=None, pad_edge=False)
    for column in ("module", "runs", "p50 s", "p95 s", "fail", "retry", "timeout_s", "retry.max_attempts",
                   "tokens/run", "cost/run", "LM cache hits"):
        table.add_column(column)
    for name, stats in report.modules.items():
        retry = stats.recommended_retry["max_attempts"] if stats.recommended_retry else "-"
        lookups = stats.lm_cache_hits + stats.lm_cache_misses
        table.add_row(name, str(stats.runs), _num(stats.p50_s), _num(stats.p95_s), f"{stats.failure_rate:.0%}",
                      f"{stats.retry_rate:.0%}", _num(stats.recommended_timeout_s, 1), str(retry),
                      _num(stats.tokens_per_run, 1), cost_text(stats.cost_per_run),
                      f"{stats.lm_cache_hits}/{lookups}" if lookups else "-")
    console.print(table)
    console.print(f"critical path ({report.critical_path_s:.3f} s): {' -> '.join(report.critical_path)}")
    for item in report.bottlenecks:
        console.print(f"  bottleneck {item.module}: p50 {item.p50_s:.3f} s, path {item.saving_s:.3f} s shorter if instant")
    console.print(f"strategy: {report.strategy.recommended} ({report.strategy.reason})")
    if slots := report.profile.get("slots"):
        learned = ", ".join(f"{resource} {count}" for resource, count in slots.items())
        console.print(f"slots per resource class (most modules running at once): {learned}")
    console.print(profile_line(report))


def profile_line(report: Report) -> str:
    """What happens to the profile: saved (and what later runs take from it), or not (``--dry-run``)."""
    uses = ("its priorities (skip with run --no-profile), and its timeout_s only where learned timeouts are on "
            "(run --learned-timeouts, 'timeouts: learned' in the program, or DSPEX_LEARNED_TIMEOUTS=1)")
    if report.saved:
        return f"profile saved: later runs of this version take {uses}"
    return f"dry run, profile not saved (the stored one is unchanged): later runs would take {uses}"


# --- status -------------------------------------------------------------------------------------


@click.command()
@connection_options
@json_option
def status(broker: str | None, result_backend: str | None, as_json: bool) -> None:
    """Live executions, queue depths per resource class, and the workers that serve them."""
    runtime = cluster_runtime(broker, result_backend, "status")
    workers = live_workers(runtime)
    served = [resource for resources in workers.values() for resource in resources]
    data: dict[str, Any] = {"live": live_executions(runtime),
                            "queues": queue_depths(runtime, known_resources(runtime, served)), "workers": workers}
    if as_json:
        print_json(data)
        return
    console = Console(highlight=False)
    for line in status_lines(data, console.width):
        console.print(line)


def status_lines(data: dict[str, Any], width: int) -> list[str | Table]:
    """``status``'s headings and tables within ``width`` columns (execution ids and workers whole)."""
    live = [[item["execution_id"], item["program"] or "?", f"{item['age_s']:.1f}",
             ", ".join(f"{count} {state}" for state, count in item["modules"].items())] for item in data["live"]]
    queues = [[resource, str(depth)] for resource, depth in data["queues"].items()]
    workers = [[node, ", ".join(resources)] for node, resources in data["workers"].items()]
    return [
        f"[bold]{len(live)} live execution(s)[/bold]",
        *([fitted_table(("execution", "program", "age s", "modules"), live, width, ids=("execution",))] * bool(live)),
        "[bold]queue depths[/bold]",
        fitted_table(("resource", "waiting"), queues, width, ids=("resource",)),
        f"[bold]{len(workers)} live worker(s)[/bold]",
        *([fitted_table(("worker", "resources"), workers, width, ids=("worker",))] * bool(workers)),
    ]


def live_executions(runtime: Runtime) -> list[dict[str, Any]]:
    """Executions in the ``{ns}:live`` set, with module counts per state."""
    store = runtime.store
    now = utcnow().timestamp()
    entries = store.client.zrange(store.global_key("live"), 0, -1, withscores=True)
    live = []
    for execution_id, score in entries:
        plan = store.plan(execution_id)
        records = store.records(execution_id)
        counts = Counter(record.status.value for record in records.values())
        if plan is not None:
            counts["pending"] += len(plan.modules) - len(records)
        live.append({
            "execution_id": execution_id,
            "program": plan.program if plan else None,
            "submitted_at": isoformat(datetime.fromtimestamp(score).astimezone()),
            "age_s": round(now - score, 3),
            "modules": dict(sorted(counts.items())),
        })
    return live


def known_resources(runtime: Runtime, served: Iterable[str] = ()) -> list[str]:
    """Resource classes of configured limits, live plans, live workers (``served``) and (Redis
    brokers) existing queues."""
    names = {"default", CONTROL, *runtime.settings.resources, *served}
    for execution_id in runtime.store.live_executions():
        plan = runtime.store.plan(execution_id)
        if plan is not None:
            names.update(module.resource for module in plan.modules.values())
    broker = runtime.settings.broker_url or ""
    if broker.startswith(("redis://", "rediss://")):
        import redis

        prefix = queue_name(runtime.settings.namespace, "")
        client = redis.Redis.from_url(broker, decode_responses=True)
        for key in client.scan_iter(match=f"{prefix}*", count=1000, _type="list"):
            names.add(key[len(prefix):].split("\x06\x16")[0])
    return sorted(names)


def queue_depths(runtime: Runtime, resources: list[str]) -> dict[str, int]:
    """Messages waiting in each resource class's queue (0 when the queue does not exist)."""
    depths = {}
    with runtime.app.connection_for_read() as connection:
        for resource in resources:
            try:
                with connection.channel() as channel:
                    declared = channel.queue_declare(queue=queue_name(runtime.settings.namespace, resource), passive=True)
                depths[resource] = int(declared.message_count)
            except Exception:  # kombu: NOT_FOUND when nothing was ever queued there
                depths[resource] = 0
    return depths


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    return None if start is None or end is None else round((end - start).total_seconds(), 6)


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
