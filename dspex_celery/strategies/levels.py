"""``levels`` and ``sequential``: a chord per stage whose body advances to the next stage."""

from __future__ import annotations

from collections.abc import Mapping

from dspex_celery.canvas import stage_signature
from dspex_celery.execution import Execution
from dspex_celery.plan import Plan
from dspex_celery.results import ExecutionStatus, ModuleRecord, ModuleStatus
from dspex_celery.strategies.base import Strategy, blocking_of, split_blocked


class StagedStrategy(Strategy):
    """Dispatches the modules of one stage at a time: a chord whose body, the ``advance`` task,
    calls :meth:`stage_done`. Subclasses say what the stages are."""

    def stages(self, plan: Plan) -> list[list[str]]:
        """Groups of modules dispatched together, in order."""
        raise NotImplementedError

    def start(self, execution: Execution) -> None:
        self.advance(execution, 0)

    def stage_done(self, execution: Execution, stage: int) -> None:
        """After the chord of ``stage - 1`` (or its errback): settle it, check the deadline, go on."""
        plan = execution.plan
        if plan is None:
            return
        store = execution.store
        if store.is_finished(execution.id):  # re-delivered after its worker died while finishing?
            execution.finish_abandoned(store.meta(execution.id))
            return
        if stage > 0:
            for name in execution.settle_stage(self.stages(plan)[stage - 1]):
                self.module_finished(execution, name, ModuleStatus.FAILED)
        if not execution.deadline_passed():
            self.advance(execution, stage)

    def advance(self, execution: Execution, stage: int) -> None:
        """Dispatch the next stage that has runnable modules, or finish the execution."""
        store, plan = execution.store, execution.plan
        if plan is None or store.is_finished(execution.id):
            return
        # A failure beyond the budget already finished the execution (the failing module checks it).
        all_stages = self.stages(plan)
        while stage < len(all_stages):
            names = all_stages[stage]
            parents = [parent for name in names for parent in plan.modules[name].parents]
            runnable, skipped = triage(plan, names, store.records_of(execution.id, [*names, *parents]))
            for name, parent, status in skipped:
                execution.skip(name, parent, status)
            if runnable:
                namespace = execution.runtime.settings.namespace
                stage_signature(execution.runtime.app, plan, execution.id, self.name, stage, runnable,
                                namespace).apply_async()
                return
            stage += 1
        execution.finish(ExecutionStatus.SUCCEEDED)


def triage(plan: Plan, names: list[str],
           records: Mapping[str, ModuleRecord]) -> tuple[list[str], list[tuple[str, str, str]]]:
    """A stage's modules to dispatch, and those to skip (with the parent that blocks each and its
    status); modules that already succeeded (reused from an earlier execution) are neither."""
    pending = [name for name in names if not (name in records and records[name].status is ModuleStatus.SUCCEEDED)]
    blocking = blocking_of(records)
    runnable, skipped = split_blocked(plan, pending, blocking)
    return runnable, [(name, parent, blocking[parent]) for name, parent in skipped]


class LevelsStrategy(StagedStrategy):
    """A stage per dependency level."""

    name = "levels"

    def stages(self, plan: Plan) -> list[list[str]]:
        return plan.levels


class SequentialStrategy(StagedStrategy):
    """A stage per module, in topological order."""

    name = "sequential"

    def stages(self, plan: Plan) -> list[list[str]]:
        return [[name] for name in plan.topological_order()]
