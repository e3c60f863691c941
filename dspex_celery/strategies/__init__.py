"""Execution strategies: how modules of an execution get dispatched.

A strategy starts an execution and hears about every module that reaches a final state; the
``levels`` family lets chords do the waiting, ``dag`` dispatches each module when its parents
are done.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING, Any

from dspex_celery.results import ModuleRecord, ModuleStatus
from dspex_celery.runtime import Runtime

if TYPE_CHECKING:
    from dspex_celery.plan import Plan

#: Within one level, durations differing by more than this factor make level barriers costly.
DURATION_SPREAD = 1.5


class Strategy:
    """Base class: a named way to dispatch an execution's modules."""

    name: str = ""

    def start(self, runtime: Runtime, execution_id: str) -> None:
        """Dispatch the first modules of a freshly stored execution."""
        raise NotImplementedError

    def module_finished(self, runtime: Runtime, execution_id: str, module: str, status: ModuleStatus) -> None:
        """Called on the worker once a module's record is final (succeeded, failed, ...)."""

    def module_succeeded(self, runtime: Runtime, execution_id: str, module: str, output: dict[str, Any],
                         record: ModuleRecord) -> bool:
        """Store a succeeded module's output and final record, then go on with the execution.

        False, with nothing stored, when the execution had already ended (cancel, timeout, failure).
        """
        if runtime.store.save_success(execution_id, module, output, record) is None:
            return False
        self.module_finished(runtime, execution_id, module, ModuleStatus.SUCCEEDED)
        return True


def get_strategy(name: str) -> Strategy:
    """The strategy called ``name`` (one of :data:`dspex_celery.plan.STRATEGIES`)."""
    return _registry()[name]


@cache
def _registry() -> dict[str, Strategy]:
    """Strategies are stateless: one instance of each per process (asked for on every module)."""
    from dspex_celery.strategies.dag import DagStrategy
    from dspex_celery.strategies.levels import LevelsStrategy

    return {
        "levels": LevelsStrategy("levels"),
        "sequential": LevelsStrategy("sequential"),
        "dag": DagStrategy(),
    }


def recommend_strategy(plan: Plan, durations: dict[str, float] | None = None) -> tuple[str, str]:
    """The strategy to use when none is asked for, and why.

    ``levels`` when every level barrier is free: each module needs all of the level above it (and
    known durations within a level are alike). Otherwise ``dag``, which never makes a module wait
    for modules it does not depend on.
    """
    for upper, lower in zip(plan.levels, plan.levels[1:], strict=False):
        needs_all = set(upper)
        for name in lower:
            if set(plan.modules[name].parents) != needs_all:
                return "dag", f"unbalanced levels: '{name}' does not need every module of the level above"
    for level in plan.levels if durations else []:
        known = [durations[name] for name in level if durations and name in durations]
        if len(known) > 1 and max(known) > DURATION_SPREAD * max(min(known), 1e-6):
            return "dag", "unbalanced levels: observed durations within a level differ widely"
    return "levels", "balanced levels: every module needs the whole level above it"
