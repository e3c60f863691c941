"""``dspex-celery compensate EXECUTION_ID``: run the failed compensations of an ended execution again."""

from __future__ import annotations

import time

import click
from rich.console import Console
from rich.table import Table

from dspex_celery import compensation_store
from dspex_celery.cli.options import Seconds, cluster_runtime, connection_options
from dspex_celery.cli.render import print_json
from dspex_celery.errors import UnknownExecution, UsageError
from dspex_celery.execution import Execution
from dspex_celery.results import CompensationRecord, CompensationStatus, ExecutionStatus
from dspex_celery.runtime import Runtime
from dspex_celery.saga import in_progress, to_rerun

#: How often the command looks at the compensations it sent.
POLL_S = 0.2
_ENDED = (CompensationStatus.SUCCEEDED, CompensationStatus.FAILED)


@click.command()
@click.argument("execution_id", metavar="EXECUTION_ID")
@connection_options
@click.option("--timeout", type=Seconds(min=0, min_open=True), default=300.0, show_default=True,
              help="Seconds to wait for the compensations to end.")
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object.")
def compensate(execution_id: str, broker: str | None, result_backend: str | None, timeout: float,
               as_json: bool) -> None:
    """Run the failed compensations of an ended execution again; wait and print how they ended."""
    runtime = cluster_runtime(broker, result_backend, "compensate")
    names = rerun_compensations(runtime, execution_id)
    records = wait_compensations(runtime, execution_id, names, timeout) if names else {}
    if as_json:
        print_json({"execution_id": execution_id, "rerun": names,
                    "compensations": {name: record.model_dump(mode="json") for name, record in records.items()}})
    elif not names:
        click.echo(f"execution {execution_id}: no failed compensation to run again")
    else:
        Console().print(summary_table(records))
    if any(record.status is not CompensationStatus.SUCCEEDED for record in records.values()):
        raise SystemExit(1)


def rerun_compensations(runtime: Runtime, execution_id: str) -> list[str]:
    """Send the execution's failed (or never run) compensations again, in their order; returns them."""
    execution = Execution(runtime, execution_id)
    if execution.plan is None:
        raise UnknownExecution(f"no execution '{execution_id}' in the state store (unknown or expired)")
    status = ExecutionStatus(runtime.store.meta_field(execution_id, "status", ExecutionStatus.RUNNING.value))
    if not status.final:
        raise UsageError(f"execution {execution_id} is still {status.value}: compensate it once it has ended "
                         f"(or cancel it: dspex-celery cancel {execution_id})")
    records = compensation_store.records(runtime.store, execution_id)
    busy = in_progress(records)
    if busy:
        raise UsageError(f"execution {execution_id}: compensations of {', '.join(busy)} are running now; "
                         "wait for them to end")
    names = to_rerun(records)
    compensation_store.reset_failed(runtime.store, execution_id, names)
    if names:
        execution.compensate(names)
    return names


def wait_compensations(runtime: Runtime, execution_id: str, names: list[str],
                       timeout: float) -> dict[str, CompensationRecord]:
    """The records of ``names`` once each has ended (or as they are after ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        records = compensation_store.records(runtime.store, execution_id)
        chosen = {name: records[name] for name in names if name in records}
        if all(record.status in _ENDED for record in chosen.values()) or time.monotonic() > deadline:
            return chosen
        time.sleep(POLL_S)


def summary_table(records: dict[str, CompensationRecord]) -> Table:
    table = Table("module", "compensation", "attempts", "error")
    for name, record in records.items():
        table.add_row(name, record.status.value, str(record.attempts), record.error or "")
    return table
