"""Terminal output of the CLI: JSON to stdout, or a readable summary with rich."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from dspex_celery.results import ExecutionResult, ModuleStatus

STATUS_STYLE = {
    ModuleStatus.SUCCEEDED: "green",
    ModuleStatus.FAILED: "red",
    ModuleStatus.SKIPPED: "yellow",
    ModuleStatus.CANCELLED: "magenta",
}


def print_json(data: Any) -> None:
    """Exactly one JSON document on stdout."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False) + "\n")


def print_result(result: ExecutionResult) -> None:
    """A human summary: status line, outputs, one row per module."""
    console = Console(highlight=False)
    style = "green" if result.succeeded else "red"
    console.print(
        f"[bold]{result.program}[/bold] {result.execution_id} "
        f"[{style}]{result.status.value}[/{style}] (strategy {result.strategy})"
    )
    if result.error:
        console.print(f"[red]error:[/red] {result.error}", soft_wrap=True)
    for key, value in result.outputs.items():
        console.print(f"  [bold]{key}[/bold]: {json.dumps(value, ensure_ascii=False)}", soft_wrap=True)
    console.print(module_table(result))


def module_table(result: ExecutionResult) -> Table:
    table = Table(show_edge=False, box=None, pad_edge=False)
    for column in ("module", "status", "attempts", "seconds", "worker", "error"):
        table.add_column(column)
    for name, record in result.modules.items():
        style = STATUS_STYLE.get(record.status, "")
        seconds = f"{record.duration_s:.3f}" if record.duration_s is not None else "-"
        table.add_row(
            name,
            f"[{style}]{record.status.value}[/{style}]" if style else record.status.value,
            str(record.attempts),
            seconds,
            record.worker or "-",
            record.error or "",
        )
    return table
