"""Recovering executions: ``cancel``, ``resume`` and ``breakers``."""

from __future__ import annotations

from typing import Any

import click
from rich.console import Console
from rich.table import Table

from dspex_celery.breaker import circuits, reset_circuit
from dspex_celery.cli.distribute import is_distributed, resume_distributed
from dspex_celery.cli.options import Seconds, cluster_runtime, connection_options, strategy_option
from dspex_celery.cli.progress import submit_and_report
from dspex_celery.cli.render import fitted_table, print_json
from dspex_celery.client import ExecutionHandle, resume_execution
from dspex_celery.results import ModuleStatus

execution_argument = click.argument("execution_id", metavar="EXECUTION_ID")
json_option = click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object.")


@click.command()
@execution_argument
@connection_options
@json_option
def cancel(execution_id: str, broker: str | None, result_backend: str | None, as_json: bool) -> None:
    """Cancel an execution: revoke its pending modules, terminate the running ones (prefork workers)."""
    runtime = cluster_runtime(broker, result_backend, "cancel")
    handle = ExecutionHandle(runtime, execution_id)
    was_running = not handle.status().final
    result = handle.cancel()
    if as_json:
        print_json(result.to_json_dict())
        return
    if not was_running:
        click.echo(f"execution {execution_id} had already ended: {result.status.value}")
        return
    cancelled = sum(record.status is ModuleStatus.CANCELLED for record in result.modules.values())
    click.echo(f"execution {execution_id} {result.status.value}: {cancelled} module(s) cancelled")


@click.command()
@execution_argument
@connection_options
@strategy_option("Execution strategy (default: the original execution's).")
@click.option("--timeout", type=Seconds(min=0, min_open=True), default=None,
              help="Fail the new execution after SECONDS.")
@json_option
@click.option("-q", "--quiet", is_flag=True, help="No live progress display.")
def resume(execution_id: str, broker: str | None, result_backend: str | None, strategy: str | None,
           timeout: float | None, as_json: bool, quiet: bool) -> None:
    """Run an ended execution again, reusing the outputs of its succeeded modules."""
    runtime = cluster_runtime(broker, result_backend, "resume")
    if is_distributed(runtime, execution_id):  # distribute(module)'s: replay forward (cli/distribute.py)
        resume_distributed(runtime, execution_id, as_json)
        return
    submit_and_report(lambda: resume_execution(execution_id, app=runtime.app, strategy=strategy, timeout=timeout),
                      as_json, quiet)


@click.group(invoke_without_command=True)
@connection_options
@json_option
@click.pass_context
def breakers(ctx: click.Context, broker: str | None, result_backend: str | None, as_json: bool) -> None:
    """Show the circuit breakers (named PROGRAM.MODULE) that are open or have counted failures."""
    ctx.obj = (broker, result_backend)
    if ctx.invoked_subcommand is not None:
        return
    found = circuits(cluster_runtime(broker, result_backend, "breakers").store)
    if as_json:
        print_json(found)
        return
    if not found:
        click.echo("every circuit is closed")
        return
    console = Console(highlight=False)
    console.print(breaker_table(found, console.width))


def breaker_table(found: list[dict[str, Any]], width: int) -> Table:
    """The circuits within ``width`` columns (their names whole)."""
    rows = [[circuit["name"], circuit["state"], f"{circuit['failures']}/{circuit['threshold'] or '?'}",
             f"{circuit['retry_in_s']:.1f}" if circuit["retry_in_s"] else "-"] for circuit in found]
    return fitted_table(("circuit", "state", "failures", "retry in s"), rows, width, ids=("circuit",))


@breakers.command("reset")
@click.argument("name", metavar="PROGRAM.MODULE")
@connection_options
@click.pass_context
def reset_breaker(ctx: click.Context, name: str, broker: str | None, result_backend: str | None) -> None:
    """Close the circuit NAME (forget its failures)."""
    group_broker, group_backend = ctx.obj
    runtime = cluster_runtime(broker or group_broker, result_backend or group_backend, "breakers reset")
    reset_circuit(runtime.store, name)
    click.echo(f"circuit {name} closed")
