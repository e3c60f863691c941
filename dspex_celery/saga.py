"""Which modules of an ended execution are compensated, and in which order (pure: no I/O).

An execution that ends ``failed`` (a failure under ``strict``, one over its ``threshold``, its timeout)
or ``cancelled`` undoes the side effects of the modules that succeeded *in it*: each that names
``compensate:``, children before their parents (reverse topological order). Modules reused from an
earlier execution (``resume``) are left alone: their side effects belong to the execution that ran them.
A ``tolerant`` execution within its threshold ends ``succeeded`` and compensates nothing.
"""

from __future__ import annotations

from collections.abc import Mapping

from dspex_celery.plan import Plan
from dspex_celery.results import CompensationRecord, CompensationStatus, ExecutionStatus, ModuleRecord, ModuleStatus

COMPENSATING_STATUSES = frozenset({ExecutionStatus.FAILED, ExecutionStatus.CANCELLED})


def compensates(status: ExecutionStatus) -> bool:
    """True when an execution ending with ``status`` undoes its modules' side effects."""
    return status in COMPENSATING_STATUSES


def compensation_order(plan: Plan, records: Mapping[str, ModuleRecord]) -> list[str]:
    """The modules to compensate, in the order their compensations run: succeeded here (not reused),
    naming ``compensate:``, in reverse topological order."""
    return [
        name for name in reversed(plan.topological_order())
        if plan.modules[name].compensate is not None
        and (record := records.get(name)) is not None
        and record.status is ModuleStatus.SUCCEEDED and not record.reused
    ]


def to_rerun(compensations: Mapping[str, CompensationRecord]) -> list[str]:
    """The compensations ``dspex-celery compensate`` runs again (failed, or never run), in their order."""
    return [name for name, record in compensations.items()
            if record.status in (CompensationStatus.FAILED, CompensationStatus.PENDING)]


def in_progress(compensations: Mapping[str, CompensationRecord]) -> list[str]:
    """The compensations a worker is running (or retrying) now."""
    return [name for name, record in compensations.items()
            if record.status in (CompensationStatus.RUNNING, CompensationStatus.RETRYING)]
