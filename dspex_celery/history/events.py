"""History events: what workers publish and the listener writes, and snapshots of the state store.

Two kinds: a module record changed (``RecordEvent``; one per ``write_record``) and an execution
finished (``FinishedEvent``). Both are idempotent to apply, in any order and any number of times:
rows are keyed by (execution, module, attempt) and a state only ever replaces a lower-ranked one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from dspex_celery.compensation_store import records as compensation_records
from dspex_celery.plan import Plan
from dspex_celery.results import (
    ExecutionResult,
    ExecutionStatus,
    ModuleRecord,
    ModuleStatus,
    build_result,
)
from dspex_celery.routing import queue_name
from dspex_celery.state import StateStore

#: History-only attempt status: the attempt's worker died before it reported (a later attempt exists).
LOST = "lost"

#: How far a state has got; an upsert never replaces a higher rank (events arrive out of order).
ATTEMPT_RANK: dict[str, int] = {
    ModuleStatus.PENDING: 0,
    ModuleStatus.RUNNING: 1,
    ModuleStatus.RETRYING: 2,
    ModuleStatus.SKIPPED: 3,
    ModuleStatus.CANCELLED: 3,
    LOST: 3,
    ModuleStatus.FAILED: 4,
    ModuleStatus.SUCCEEDED: 4,
}
RUNNING_RANK = 1
FINAL_RANK = 2  # of an execution

@dataclass(frozen=True, slots=True)
class RecordEvent:
    """A module record was written (attempt ``record.attempts``; 0 = never started)."""

    execution_id: str
    module: str
    record: ModuleRecord
    queue: str | None = None


@dataclass(frozen=True, slots=True)
class FinishedEvent:
    """An execution's result was published."""

    result: ExecutionResult

    @property
    def execution_id(self) -> str:
        return self.result.execution_id


Event = RecordEvent | FinishedEvent


@dataclass(frozen=True, slots=True)
class ExecutionInfo:
    """What the history needs to know about an execution when it first hears of it."""

    execution_id: str
    program: str | None = None
    fingerprint: str | None = None
    strategy: str | None = None
    status: str = ExecutionStatus.RUNNING.value
    inputs_digest: str | None = None
    submitted_at: str | None = None
    resumed_from: str | None = None
    plan: Plan | None = None


def record_event(namespace: str, execution_id: str, module: str, record: ModuleRecord) -> RecordEvent:
    queue = queue_name(namespace, record.resource) if record.resource else None
    return RecordEvent(execution_id, module, record, queue)


# --- stream encoding (flat string fields, JSON inside) --------------------------------------------


def encode(event: Event) -> dict[str, str]:
    if isinstance(event, RecordEvent):
        return {
            "kind": "record",
            "execution_id": event.execution_id,
            "module": event.module,
            "queue": event.queue or "",
            "record": event.record.model_dump_json(),
        }
    return {"kind": "finished", "execution_id": event.execution_id, "result": event.result.model_dump_json()}


def decode(fields: dict[str, str]) -> Event:
    if fields["kind"] == "finished":
        return FinishedEvent(ExecutionResult.model_validate_json(fields["result"]))
    record = ModuleRecord.model_validate_json(fields["record"])
    return RecordEvent(fields["execution_id"], fields["module"], record, fields.get("queue") or None)


# --- the state store as a source ------------------------------------------------------------------


def inputs_digest(inputs: Any) -> str:
    canonical = json.dumps(inputs, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def describe(store: StateStore, execution_id: str) -> ExecutionInfo:
    """The execution as the state store knows it (fields are None once it expired)."""
    meta = store.meta(execution_id)
    plan = store.plan(execution_id)
    return ExecutionInfo(
        execution_id=execution_id,
        program=meta.get("program") or (plan.program if plan else None),
        fingerprint=meta.get("fingerprint") or (plan.fingerprint if plan else None),
        strategy=meta.get("strategy"),
        status=meta.get("status", ExecutionStatus.RUNNING.value),
        inputs_digest=inputs_digest(meta["inputs"]) if "inputs" in meta else None,
        submitted_at=meta.get("submitted_at"),
        resumed_from=meta.get("resumed_from"),
        plan=plan,
    )


def snapshot(store: StateStore, execution_id: str, published: dict[str, Any] | None = None) -> list[Event]:
    """Every event the store can still tell about an execution (for reconciliation).

    ``published`` is the execution's published result (the Celery result), if known; otherwise a
    finished execution's result is rebuilt from the store.
    """
    namespace = store.namespace
    events: list[Event] = []
    for entry in store.attempts(execution_id):  # every finished attempt
        module = entry.pop("module")
        entry.pop("attempt", None)
        events.append(record_event(namespace, execution_id, module, ModuleRecord.model_validate(entry)))
    for module, record in store.records(execution_id).items():
        events.append(record_event(namespace, execution_id, module, record))
    result = finished_result(store, execution_id, published)
    if result is not None:
        events.append(FinishedEvent(result))
    return events


def finished_result(
    store: StateStore, execution_id: str, published: dict[str, Any] | None = None
) -> ExecutionResult | None:
    """The result of a finished execution (the published one if given, else rebuilt); None if open."""
    if published is not None:  # with its compensations as they are now (the result showed them pending)
        result = ExecutionResult.model_validate(published)
        return result.model_copy(update={"compensations": compensation_records(store, execution_id)})
    meta = store.meta(execution_id)
    plan = store.plan(execution_id)
    status = ExecutionStatus(meta.get("status", ExecutionStatus.RUNNING.value))
    if plan is None or not status.final:
        return None
    records, outputs = store.records(execution_id), store.outputs(execution_id, plan.modules)
    result = build_result(execution_id, plan, meta, records, outputs, status, finished_at=meta.get("finished_at"))
    return result.model_copy(update={"compensations": compensation_records(store, execution_id)})
