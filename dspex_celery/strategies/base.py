"""What every strategy is: the :class:`Strategy` base class, and the decisions strategies share.

A strategy is handed the :class:`~dspex_celery.execution.Execution` it acts on by its caller (the
client starts it, the worker's tasks tell it about finished modules), so the engine below never
looks strategies up.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from dspex_celery.continuation import Offer
from dspex_celery.execution import Execution
from dspex_celery.plan import Plan
from dspex_celery.results import ModuleRecord, ModuleStatus

#: A parent in one of these states stops its children from running (they are skipped).
BLOCKING = (ModuleStatus.FAILED, ModuleStatus.SKIPPED, ModuleStatus.CANCELLED)


class Strategy:
    """Base class: a named way to dispatch an execution's modules. Strategies are stateless (one
    instance of each per process, see :mod:`dspex_celery.strategies.registry`)."""

    name: str = ""

    def start(self, execution: Execution) -> None:
        """Dispatch the first modules of a freshly stored execution."""
        raise NotImplementedError

    def starts_in_pipeline(self, execution: Execution) -> bool:
        """Whether :meth:`queue_start` can start this new execution (default: no, call :meth:`start`)."""
        return False

    def queue_start(self, execution: Execution, pipe: Any) -> None:
        """Add to ``pipe`` (a transaction) what :meth:`start` does for a new execution without records,
        so that many are started in one round trip (batch runs); only when :meth:`starts_in_pipeline`."""
        raise NotImplementedError

    def module_finished(self, execution: Execution, module: str, status: ModuleStatus) -> None:
        """Called on the worker once a module's record is final (succeeded, failed, ...)."""

    def module_succeeded(self, execution: Execution, module: str, output: dict[str, Any],
                         record: ModuleRecord, offer: Offer | None = None) -> bool:
        """Store a succeeded module's output and final record, then go on with the execution; a
        strategy may lease one ready child to the worker's ``offer`` (sets ``offer.claimed``).

        False, with nothing stored, when the execution had already ended (cancel, timeout, failure).
        """
        if execution.store.save_success(execution.id, module, output, record) is None:
            return False
        self.module_finished(execution, module, ModuleStatus.SUCCEEDED)
        return True


# --- shared decisions (pure) ----------------------------------------------------------------------


def blocking_of(records: Mapping[str, ModuleRecord]) -> dict[str, str]:
    """The modules whose record stops their children, with that record's status."""
    return {name: record.status.value for name, record in records.items() if record.status in BLOCKING}


def blocked_by(plan: Plan, name: str, blocking: Mapping[str, str]) -> str | None:
    """The first parent of ``name`` that stops it (a key of ``blocking``), if any."""
    return next((parent for parent in plan.modules[name].parents if parent in blocking), None)


def split_blocked(plan: Plan, names: Iterable[str],
                  blocking: Mapping[str, str]) -> tuple[list[str], list[tuple[str, str]]]:
    """``names`` split into those that may run and those to skip, each with the parent that blocks it."""
    runnable: list[str] = []
    skipped: list[tuple[str, str]] = []
    for name in names:
        parent = blocked_by(plan, name, blocking)
        if parent is None:
            runnable.append(name)
        else:
            skipped.append((name, parent))
    return runnable, skipped
