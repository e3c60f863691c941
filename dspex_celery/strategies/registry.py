"""The strategies there are, by name: the one registry, and choosing one for a program.

A new strategy is a module with a :class:`~dspex_celery.strategies.base.Strategy` subclass, plus
its instance in :data:`_STRATEGIES` here (and its import): nothing else has to change.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dspex_celery.errors import UsageError
from dspex_celery.plan import Plan
from dspex_celery.strategies.base import Strategy
from dspex_celery.strategies.dag import DagStrategy
from dspex_celery.strategies.forward import ForwardStrategy
from dspex_celery.strategies.levels import LevelsStrategy, SequentialStrategy

#: Strategies are stateless: one instance of each per process (asked for on every module).
_STRATEGIES: tuple[Strategy, ...] = (LevelsStrategy(), SequentialStrategy(), DagStrategy(), ForwardStrategy())
_BY_NAME: dict[str, Strategy] = {strategy.name: strategy for strategy in _STRATEGIES}

#: The strategies' names (what ``--strategy`` accepts; ``forward`` is only for ``distribute``'s executions).
STRATEGIES: tuple[str, ...] = tuple(name for name in _BY_NAME if name != ForwardStrategy.name)

#: What an execution whose meta names no strategy (it expired meanwhile) is taken to run with.
FALLBACK_STRATEGY = "levels"

#: Within one level, durations differing by more than this factor make level barriers costly.
DURATION_SPREAD = 1.5


def get_strategy(name: str) -> Strategy:
    """The strategy called ``name`` (KeyError when none is)."""
    return _BY_NAME[name]


def strategy_of(meta: Mapping[str, Any]) -> Strategy:
    """The strategy an execution runs with, from its meta."""
    return _BY_NAME[meta.get("strategy", FALLBACK_STRATEGY)]


def choose_strategy(plan: Plan, requested: str | None) -> str:
    """The strategy to run with: the requested one, else the recommended one."""
    if requested is None:
        return recommend_strategy(plan)[0]
    if requested not in _BY_NAME:
        raise UsageError(f"unknown strategy '{requested}': choose one of {', '.join(STRATEGIES)}")
    return requested


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
