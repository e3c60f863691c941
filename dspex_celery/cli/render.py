"""Terminal output of the CLI: JSON to stdout, or a readable summary with rich."""

from __future__ import annotations

import json
import sys
from collections.abc import Collection, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from dspex_celery.results import ExecutionResult, ModuleStatus
from dspex_celery.usage import total_usage, usage_cells

STATUS_STYLE = {
    ModuleStatus.SUCCEEDED: "green",
    ModuleStatus.FAILED: "red",
    ModuleStatus.SKIPPED: "yellow",
    ModuleStatus.CANCELLED: "magenta",
}


#: The narrowest a truncated column gets ("succ…"); a column that would need less is left out.
MIN_COLUMN_WIDTH = 5
#: Space rich puts between two columns of a table without edges (padding of one each side).
COLUMN_GAP = 2


def fitted_table(headers: Sequence[str], rows: Sequence[Sequence[str]], width: int,
                 ids: Collection[str] = ()) -> Table:
    """A table of ``rows`` (rich markup allowed) no wider than ``width``: the columns named in ``ids``
    are shown whole; when the rest do not fit, the rightmost are cut short (``…``), then left out."""
    natural = [max([len(header), *(_cell_width(row[index]) for row in rows)]) for index, header in enumerate(headers)]
    widths: list[int | None] = list(natural)
    excess = sum(natural) + COLUMN_GAP * (len(headers) - 1) - width
    for index in reversed(range(len(headers))):
        if excess <= 0:
            break
        if headers[index] in ids:
            continue
        if natural[index] - excess >= min(MIN_COLUMN_WIDTH, natural[index]):
            widths[index], excess = natural[index] - excess, 0
        else:
            widths[index], excess = None, excess - natural[index] - COLUMN_GAP
    shown = [index for index, column_width in enumerate(widths) if column_width is not None]
    table = Table(show_edge=False, box=None, pad_edge=False)
    for index in shown:
        table.add_column(headers[index], no_wrap=True, overflow="ellipsis", width=widths[index],
                         min_width=natural[index] if headers[index] in ids else None)
    for row in rows:
        table.add_row(*(row[index] for index in shown))
    return table


def _cell_width(cell: str) -> int:
    return max((Text.from_markup(line).cell_len for line in cell.splitlines()), default=0)


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
    usage = total_usage(result.modules.values())
    if not usage.empty:
        console.print(f"LM usage: {usage.describe()}", soft_wrap=True)
    console.print(module_table(result, lm=not usage.empty))
    if result.compensations:
        console.print(compensation_table(result))


LM_COLUMNS = ("tokens", "cost", "LM cache")


def compensation_table(result: ExecutionResult) -> Table:
    """One row per compensation, in the order they run."""
    table = Table("compensation of", "status", "attempts", "worker", "error", show_edge=False, box=None,
                  pad_edge=False)
    for name, record in result.compensations.items():
        table.add_row(name, record.status.value, str(record.attempts), record.worker or "-", record.error or "")
    return table


def module_table(result: ExecutionResult, *, lm: bool = False) -> Table:
    """One row per module; ``lm``: with its LM tokens, cost and cache hits/lookups."""
    table = Table(show_edge=False, box=None, pad_edge=False)
    for column in ("module", "status", "attempts", "seconds", *LM_COLUMNS * lm, "worker", "error"):
        table.add_column(column)
    for name, record in result.modules.items():
        style = STATUS_STYLE.get(record.status, "")
        seconds = f"{record.duration_s:.3f}" if record.duration_s is not None else "-"
        table.add_row(
            name,
            f"[{style}]{record.status.value}[/{style}]" if style else record.status.value,
            str(record.attempts),
            seconds,
            *usage_cells(record) * lm,
            record.worker or "-",
            record.error or "",
        )
    return table
