"""Hooks around one module run: history, breakers, resource limits and progress plug in here.

"before" hooks run in order, "after" hooks in reverse. A hook that crashes is logged, never fatal,
except ``before_module``, which may raise a :class:`~dspex_celery.errors.DspexError` on purpose
(e.g. ``CircuitOpen``) to fail the module without calling it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar

from dspex_celery.plan import ModulePlan, Plan
from dspex_celery.results import ExecutionResult, ModuleRecord

if TYPE_CHECKING:
    from dspex_celery.runtime import Runtime
    from dspex_celery.state import LuaStep

log = logging.getLogger(__name__)


@dataclass
class ModuleContext:
    """One attempt of one module of one execution, as hooks see it."""

    runtime: Runtime
    execution_id: str
    plan: Plan
    module: ModulePlan
    attempt: int
    worker: str
    started_at: datetime
    record: ModuleRecord
    extras: dict[str, Any] = field(default_factory=dict)
    begun: dict[Hook, Any] = field(default_factory=dict)  # replies of the hooks' begin steps, if they ran

    def write_record(self) -> None:
        """Store ``record`` as it is now (e.g. while the attempt waits for a slot) and tell the hooks."""
        self.runtime.write_record(self.execution_id, self.module.name, self.record)


class Hook:
    """Base class: every method is a no-op; override the ones you need."""

    #: True when :meth:`begin_step` depends on nothing but the plan and the module (no setting or state
    #: of the process that builds it): the worker that queues a module may then build the step for the
    #: worker that takes it next (``dspex_celery.strategies.dag``), which saves that one a round trip.
    begin_step_portable: ClassVar[bool] = False

    def begin_step(self, runtime: Runtime, plan: Plan, module: ModulePlan) -> LuaStep | None:
        """Lua to run in the state store's begin script of a module's first attempt (saving a round
        trip); its reply reaches ``before_module`` as ``ctx.begun[self]`` (absent when it did not run)."""
        return None

    def before_module(self, ctx: ModuleContext) -> None:
        """Before the module is called; raise to fail this attempt without calling it."""

    def after_success(self, ctx: ModuleContext, output: dict[str, Any]) -> None:
        """After the module returned a valid output (already stored)."""

    def after_failure(self, ctx: ModuleContext, error: BaseException, will_retry: bool) -> None:
        """After an attempt failed; ``will_retry`` tells whether another attempt follows."""

    def after_module(self, ctx: ModuleContext) -> None:
        """After every attempt, whatever happened: release what ``before_module`` acquired."""

    def on_record(self, execution_id: str, module: str, record: ModuleRecord) -> None:
        """Whenever a module record is written (running, retrying, final)."""

    def publish_step(self, result: ExecutionResult) -> LuaStep | None:
        """Lua to run in the state store's script that publishes the execution's result (saving a round
        trip; only where the result backend is that Redis). ``on_execution_finished`` is still called
        afterwards: a hook whose step ran must not do its work again there."""
        return None

    def publish_failed(self, result: ExecutionResult) -> None:
        """The script that was to run this hook's :meth:`publish_step` failed: its step did not run
        (the result is published again later, with a new step)."""

    def on_execution_finished(self, result: ExecutionResult) -> None:
        """Once per execution, after its result is published."""

    def on_compensation(self, result: ExecutionResult) -> None:
        """After one of the execution's compensations ended: its result with them as they are now."""


class HookChain:
    """Runs a list of hooks with the ordering and error rules of this module."""

    def __init__(self, hooks: Sequence[Hook] = ()) -> None:
        self.hooks = list(hooks)

    def add(self, hook: Hook) -> None:
        self.hooks.append(hook)

    def begin_steps(self, runtime: Runtime, plan: Plan, module: ModulePlan) -> list[tuple[Hook, LuaStep]]:
        return [(hook, step) for hook in self.hooks if (step := hook.begin_step(runtime, plan, module)) is not None]

    def portable_begin_steps(self, runtime: Runtime, plan: Plan, module: ModulePlan) -> list[LuaStep] | None:
        """The begin steps of ``module`` when every hook that has one marks it portable, else None."""
        steps = self.begin_steps(runtime, plan, module)
        return None if any(not hook.begin_step_portable for hook, _ in steps) else [step for _, step in steps]

    def before_module(self, ctx: ModuleContext) -> None:
        for hook in self.hooks:
            hook.before_module(ctx)

    def after_success(self, ctx: ModuleContext, output: dict[str, Any]) -> None:
        self._after("after_success", ctx, output)

    def after_failure(self, ctx: ModuleContext, error: BaseException, will_retry: bool) -> None:
        self._after("after_failure", ctx, error, will_retry)

    def after_module(self, ctx: ModuleContext) -> None:
        self._after("after_module", ctx)

    def on_record(self, execution_id: str, module: str, record: ModuleRecord) -> None:
        self._after("on_record", execution_id, module, record)

    def publish_steps(self, result: ExecutionResult) -> list[LuaStep]:
        """The hooks' :meth:`Hook.publish_step` Lua (one that raises is logged and left out)."""
        steps = []
        for hook in self.hooks:
            try:
                step = hook.publish_step(result)
            except Exception:
                log.exception("hook %s.publish_step failed", type(hook).__name__)
                continue
            if step is not None:
                steps.append(step)
        return steps

    def publish_failed(self, result: ExecutionResult) -> None:
        self._after("publish_failed", result)

    def on_execution_finished(self, result: ExecutionResult) -> None:
        self._after("on_execution_finished", result)

    def on_compensation(self, result: ExecutionResult) -> None:
        self._after("on_compensation", result)

    def _after(self, method: str, *args: Any) -> None:
        for hook in reversed(self.hooks):
            try:
                getattr(hook, method)(*args)
            except Exception:
                log.exception("hook %s.%s failed", type(hook).__name__, method)
