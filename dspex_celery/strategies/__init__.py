"""Execution strategies: how modules of an execution get dispatched.

A strategy starts an execution and hears about every module that reaches a final state; the
``levels`` family lets chords do the waiting, ``dag`` dispatches each module when its parents
are done.
"""

from __future__ import annotations

from dspex_celery.results import ModuleStatus
from dspex_celery.runtime import Runtime


class Strategy:
    """Base class: a named way to dispatch an execution's modules."""

    name: str = ""

    def start(self, runtime: Runtime, execution_id: str) -> None:
        """Dispatch the first modules of a freshly stored execution."""
        raise NotImplementedError

    def module_finished(self, runtime: Runtime, execution_id: str, module: str, status: ModuleStatus) -> None:
        """Called on the worker once a module's record is final (succeeded, failed, ...)."""


def get_strategy(name: str) -> Strategy:
    """The strategy called ``name`` (one of :data:`dspex_celery.plan.STRATEGIES`)."""
    from dspex_celery.strategies.levels import LevelsStrategy

    registry: dict[str, Strategy] = {
        "levels": LevelsStrategy("levels"),
        "sequential": LevelsStrategy("sequential"),
    }
    try:
        from dspex_celery.strategies.dag import DagStrategy
    except ImportError:  # pragma: no cover - dag is optional while it is being built
        pass
    else:
        registry["dag"] = DagStrategy()
    return registry[name]
