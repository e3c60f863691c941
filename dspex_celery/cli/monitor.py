"""Operating a cluster: ``flower``, ``resources`` and ``report``."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import click
from celery import states
from celery.events.state import Task
from rich.console import Console
from rich.table import Table

from dspex_celery.cli.options import cluster_runtime, connection_options
from dspex_celery.cli.render import fitted_table, print_json
from dspex_celery.errors import UsageError
from dspex_celery.report import load_report, render_html
from dspex_celery.resources import parse_limits, snapshot


def is_loopback(address: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_flower_access(address: str, basic_auth: str | None) -> None:
    """Refuse to expose Flower beyond this machine without credentials; check their shape."""
    if basic_auth:
        for pair in basic_auth.split(","):
            user, sep, password = pair.partition(":")
            if not (sep and user and password):
                raise UsageError("--basic-auth expects USER:PASSWORD (comma-separated for several users)")
    elif not is_loopback(address):
        raise UsageError(
            f"refusing to serve Flower on {address} without authentication: pass --basic-auth USER:PASSWORD "
            "(or set DSPEX_FLOWER_BASIC_AUTH), or listen on 127.0.0.1"
        )


def keep_shadow_names() -> None:
    """Let a late ``task-sent`` event not rename a module run back to ``dspex.run_module``.

    Celery publishes ``task-sent`` after the message and with the real task name, so it can reach
    Flower after the worker's events (which carry the ``dspex.module:PROGRAM.MODULE`` name); its
    state-merge rules then apply all its fields. Keep only its routing fields in that case.
    """
    Task.merge_rules = {**Task.merge_rules, states.PENDING: ("queue", "exchange", "routing_key")}


def protect_flower_metrics() -> None:
    """Serve Flower's ``/metrics`` behind its credentials (Flower 2 leaves it open even with
    ``--basic-auth``, and it names every task and worker); ``/healthcheck`` stays open: it says only OK."""
    from flower import urls
    from flower.views.monitor import Metrics
    from tornado.web import authenticated

    class AuthenticatedMetrics(Metrics):
        get = authenticated(Metrics.get)

    for index, entry in enumerate(urls.handlers):
        if isinstance(entry, tuple) and entry[1] is Metrics:
            urls.handlers[index] = (entry[0], AuthenticatedMetrics, *entry[2:])


def flower_argv(port: int, address: str, basic_auth: str | None) -> list[str]:
    """Arguments for Flower's own command, run on the project's Celery app."""
    argv = ["flower", f"--port={port}", f"--address={address}"]
    return argv + [f"--basic-auth={basic_auth}"] if basic_auth else argv


@click.command()
@click.option("--port", type=click.IntRange(1, 65535), default=5555, show_default=True, help="HTTP port.")
@click.option("--address", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--basic-auth", metavar="USER:PASSWORD", envvar="DSPEX_FLOWER_BASIC_AUTH", default=None,
              help="Require HTTP basic auth (or DSPEX_FLOWER_BASIC_AUTH); needed off loopback.")
@connection_options
def flower(port: int, address: str, basic_auth: str | None, broker: str | None, result_backend: str | None) -> None:
    """Start the Flower monitoring UI (and its /api and /metrics) on this cluster."""
    check_flower_access(address, basic_auth)
    runtime = cluster_runtime(broker, result_backend, "flower")
    keep_shadow_names()
    protect_flower_metrics()
    raise SystemExit(runtime.app.start(flower_argv(port, address, basic_auth)) or 0)


@click.command()
@connection_options
@click.option("--json", "as_json", is_flag=True, help="Print the classes as one JSON object.")
def resources(broker: str | None, result_backend: str | None, as_json: bool) -> None:
    """Show resource-class limits (and any a 429 lowered), who holds a slot now, and utilization."""
    runtime = cluster_runtime(broker, result_backend, "resources")
    classes = snapshot(runtime.store, parse_limits(runtime.settings.resources))
    if as_json:
        print_json({"resources": classes})
        return
    if not classes:
        click.echo("no resource limits configured (set resources: in the config file or DSPEX_RESOURCES) "
                   "and none lowered by a 429")
        return
    console = Console(highlight=False)
    for table in resource_tables(classes, console.width):
        console.print(table)


def resource_tables(classes: list[dict[str, Any]], width: int) -> list[Table]:
    """The classes, then who holds a slot (``EXEC.MODULE``, whole), each within ``width`` columns."""
    rows = []
    for row in classes:
        utilization = row["utilization"]
        rows.append([str(row["resource"]), limit_cell(row), str(row["rate"] or "-"), str(row["in_use"]),
                     f"{utilization:.0%}" if isinstance(utilization, float) else "-", lowered_cell(row)])
    if not any(row[-1] for row in rows):  # no class lowered by a 429: no column for it
        rows = [row[:-1] for row in rows]
    headers = ("resource", "max", "rate", "in use", "utilization", "lowered")[:len(rows[0])]
    tables = [fitted_table(headers, rows, width, ids=("resource",))]
    holders = [[f"{holder.get('execution_id')}.{holder.get('module')}", str(row["resource"]),
                str(holder.get("worker")), f"{holder['expires_in_s']}s"]
               for row in classes for holder in row["holders"]]
    if holders:
        tables.append(fitted_table(("holder", "resource", "worker", "lease"), holders, width, ids=("holder",)))
    return tables


def limit_cell(row: dict[str, object]) -> str:
    """The class's limit now: ``8``, or ``2/8`` while a 429 has lowered it to 2 of 8."""
    adaptive = row.get("adaptive")
    if not isinstance(adaptive, dict):
        return str(row["max_concurrent"] or "-")
    return f"{adaptive['limit']}/{adaptive['cap']}"


def lowered_cell(row: dict[str, object]) -> str:
    """Why the limit is lowered, e.g. ``halved 2× after 429, +1 per 10 s quiet``; empty when it is not."""
    adaptive = row.get("adaptive")
    if not isinstance(adaptive, dict):
        return ""
    paused = f"; paused {adaptive['paused_for_s']:g} s (Retry-After)" if adaptive["paused_for_s"] else ""
    return f"{adaptive['reason']}{paused}"


@click.command()
@click.argument("execution_id")
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True), default=None,
              help="HTML file to write (default: report-EXECUTION_ID.html).")
@connection_options
def report(execution_id: str, output: str | None, broker: str | None, result_backend: str | None) -> None:
    """Write a self-contained HTML report of an execution: timeline, critical path, durations."""
    runtime = cluster_runtime(broker, result_backend, "report")
    path = Path(output or f"report-{execution_id}.html")
    html = render_html(load_report(runtime, execution_id))
    try:
        path.write_text(html, encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot write the report to {path} ({exc.strerror}): pick another -o FILE") from None
    click.echo(str(path))
