"""``levels`` and ``sequential``: a chord per stage whose body advances to the next stage."""

from __future__ import annotations

from dspex_celery.canvas import stage_signature, stages
from dspex_celery.execution import blocked_by, finish, skip
from dspex_celery.plan import Plan
from dspex_celery.results import ExecutionStatus, ModuleRecord, ModuleStatus
from dspex_celery.runtime import Runtime
from dspex_celery.strategies import Strategy


class LevelsStrategy(Strategy):
    """Stages are dependency levels (``levels``) or single modules in topological order."""

    def __init__(self, name: str) -> None:
        self.name = name

    def start(self, runtime: Runtime, execution_id: str) -> None:
        advance_execution(runtime, execution_id, self.name, 0)


def advance_execution(runtime: Runtime, execution_id: str, strategy: str, stage: int) -> None:
    """Dispatch the next stage that has runnable modules, or finish the execution."""
    store = runtime.store
    plan = store.plan(execution_id)
    if plan is None or store.is_finished(execution_id):
        return
    # A failure beyond the budget already finished the execution (the failing module checks it).
    all_stages = stages(plan, strategy)
    while stage < len(all_stages):
        names = all_stages[stage]
        parents = [parent for name in names for parent in plan.modules[name].parents]
        records = store.records_of(execution_id, [*names, *parents])
        runnable = _runnable(runtime, execution_id, plan, names, records)
        if runnable:
            namespace = runtime.settings.namespace
            stage_signature(runtime.app, plan, execution_id, strategy, stage, runnable, namespace).apply_async()
            return
        stage += 1
    finish(runtime, execution_id, ExecutionStatus.SUCCEEDED)


def _runnable(
    runtime: Runtime, execution_id: str, plan: Plan, names: list[str], records: dict[str, ModuleRecord]
) -> list[str]:
    """Modules of a stage to dispatch; those behind a failed parent are skipped on the way."""
    runnable = []
    for name in names:
        if name in records and records[name].status is ModuleStatus.SUCCEEDED:
            continue  # reused from an earlier execution
        parent = blocked_by(plan, name, records)
        if parent is not None:
            skip(runtime, execution_id, name, parent, records[parent].status.value)
            records[name] = runtime.store.record(execution_id, name)
        else:
            runnable.append(name)
    return runnable
