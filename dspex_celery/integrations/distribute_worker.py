"""A distributed ``dspy.Module``'s sub-module calls on the worker (``dspex_celery.distribute``).

Each call is the task ``dspex.run_call(execution_id, name)``: a :class:`~dspex_celery.tasks.ModuleRun`
whose module plan is the call's entry in the execution's ``calls`` hash (written by the client
before it sends the message), so retries, timeouts, breakers, resource limits and records are the
ones of any module. The worker rebuilds the distributed module from its allow-listed class, its
constructor arguments and the client's ``dump_state()`` (stored once, under its hash), once per
process, and calls the sub-module at the call's attribute path inside ``dspy.context(lm=...)``.

Call arguments are JSON; an argument that is another call's lazy output is a reference
(:data:`REF`) resolved from that call's stored output (the call's parent).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import re
import threading
from collections import OrderedDict
from typing import Any

from celery import Celery, Task

from dspex_celery.errors import ModuleInputError, ModuleStateError
from dspex_celery.execution import Execution, lost_reason
from dspex_celery.graph import resolve_uses
from dspex_celery.hooks import ModuleContext
from dspex_celery.integrations.dspy_plan import require_dspy
from dspex_celery.integrations.dspy_worker import metered_call, traced_call, wrap_dspy
from dspex_celery.plan import ModulePlan, Plan
from dspex_celery.results import ModuleStatus
from dspex_celery.runner import check_allowed, normalize_output
from dspex_celery.runtime import Runtime, runtime_of
from dspex_celery.state import ModuleStart, StateStore
from dspex_celery.strategies.forward import ForwardStrategy
from dspex_celery.tasks import ModuleRun, call_module

log = logging.getLogger(__name__)

RUN_CALL = "dspex.run_call"
#: The execution key part of the hash of call entries (name -> module plan JSON).
CALLS = "calls"
#: A reference to another call's output in a call's arguments: ``{REF: name, "field": f or None}``.
REF = "__dspex_call__"
#: The output key of a sub-module that returned something other than a ``dspy.Prediction``.
VALUE = "__dspex_value__"
#: Rebuilt modules kept per process (one per class, constructor arguments and state).
MODULE_CACHE_SIZE = 32

_modules: OrderedDict[tuple[str, str, str], Any] = OrderedDict()
_modules_lock = threading.Lock()
_STRATEGY = ForwardStrategy()


# --- call entries and state in the store ---------------------------------------------------------


def call_plan_json(module: ModulePlan) -> str:
    return json.dumps({name: getattr(module, name) for name in module.__slots__})


def call_plan_from_json(text: str) -> ModulePlan:
    data = json.loads(text)
    for key in ("depends_on", "parents", "children"):
        data[key] = tuple(data[key])
    return ModulePlan(**data)


def state_key(store: StateStore, digest: str) -> str:
    return store.global_key(f"dstate:{digest}")


def state_digest(state_json: str) -> str:
    return hashlib.sha256(state_json.encode()).hexdigest()[:24]


def read_call(store: StateStore, execution_id: str, name: str) -> ModulePlan | None:
    raw = store.client.hget(store.key(execution_id, CALLS), name)
    return None if raw is None else call_plan_from_json(raw)


def with_call(plan: Plan, module: ModulePlan) -> Plan:
    """The execution's plan as one call of it sees it: that call is its module."""
    return dataclasses.replace(plan, modules={module.name: module})


# --- the task --------------------------------------------------------------------------------------


class CallTask(Task):
    """``dspex.run_call``: a call whose task failed outside the call still gets a final record."""

    def on_failure(self, exc: BaseException, task_id: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                   einfo: Any) -> None:
        if len(args) < 2:
            return
        execution_id, name = args[0], args[1]
        try:
            runtime = runtime_of(self.app)
            execution = call_execution(runtime, execution_id, name)
            if execution is not None and execution.settle_lost(name, lost_reason(exc)):
                _STRATEGY.module_finished(execution, name, ModuleStatus.FAILED)
        except Exception:  # the store may be what failed
            log.exception("could not record the failure of call %s in %s", name, execution_id)


def call_execution(runtime: Runtime, execution_id: str, name: str) -> Execution | None:
    """The execution as call ``name`` sees it (None: unknown, expired or no such call)."""
    plan = runtime.store.plan(execution_id)
    module = read_call(runtime.store, execution_id, name) if plan is not None else None
    if plan is None or module is None:
        return None
    return Execution(runtime, execution_id, with_call(plan, module))


def register_call_task(app: Celery) -> None:
    """Register ``dspex.run_call`` on ``app`` (the composition root calls it)."""

    @app.task(name=RUN_CALL, base=CallTask, bind=True, shared=False, max_retries=None, acks_late=True,
              reject_on_worker_lost=True)
    def run_call(self: Task, execution_id: str, name: str) -> dict[str, Any]:
        runtime = runtime_of(self.app)
        execution = call_execution(runtime, execution_id, name)
        if execution is None:
            log.warning("execution %s has no call %r (expired?); dropping its message", execution_id, name)
            return {"module": name, "status": "unknown"}
        return CallRun(self, runtime, execution).run()


class CallRun(ModuleRun):
    """One attempt of one sub-module call: a module run whose callable is the rebuilt sub-module."""

    def __init__(self, task: Task, runtime: Runtime, execution: Execution) -> None:
        module = next(iter(execution.require_plan().modules.values()))
        super().__init__(task, runtime, execution.id, module.name)
        self.execution = execution

    def _call(self, ctx: ModuleContext, begin: ModuleStart) -> dict[str, Any]:
        module = ctx.module
        check_allowed(module, self.runtime.allowed_packages, ctx.plan.program)
        spec = begin.meta.get("distribute") or {}
        target = sub_module(rebuilt_module(self.store, module, str(spec.get("state", ""))), module)
        args, kwargs = resolve_call_inputs(module, begin.upstream)
        call = functools.partial(target, *args)
        if (module.inputs or {}).get("trace"):
            call = functools.partial(traced_call, self.store, self.execution_id, module.name, target, call)
        function, ctx.extras["lm_meter"] = metered_call(wrap_dspy(module, call), self.runtime)
        ctx.extras["called"] = True
        return call_output(module, call_module(module, function, kwargs))


# --- rebuilding the module -------------------------------------------------------------------------


def rebuilt_module(store: StateStore, module: ModulePlan, digest: str) -> Any:
    """``Class(**with_)`` loaded with the client's state, built once per process."""
    key = (module.uses, json.dumps(module.with_, sort_keys=True), digest)
    with _modules_lock:
        if key in _modules:
            _modules.move_to_end(key)
            return _modules[key]
    instance = build_module(store, module, digest)
    with _modules_lock:
        _modules[key] = instance
        while len(_modules) > MODULE_CACHE_SIZE:
            _modules.popitem(last=False)
    return instance


def build_module(store: StateStore, module: ModulePlan, digest: str) -> Any:
    dspy = require_dspy(f"call '{module.name}'")
    cls = resolve_uses(module.uses)  # check_allowed refused it already when outside the allow-list
    if not (isinstance(cls, type) and issubclass(cls, dspy.Module)):
        raise ModuleInputError(f"call '{module.name}': {module.uses} is not a dspy.Module class")
    instance = cls(**module.with_)
    raw = store.client.get(state_key(store, digest)) if digest else None
    if raw is None:
        raise ModuleStateError(f"call '{module.name}': the module's state {digest or '?'} is not in the "
                               "state store (expired?): run the module again")
    instance.load_state(json.loads(raw))
    return instance


def sub_module(root: Any, module: ModulePlan) -> Any:
    """The sub-module at the call's attribute path (``hop.generate_query``, ``drafts[1]``)."""
    path = str((module.inputs or {}).get("path", ""))
    try:
        target = at_path(root, path)
    except (AttributeError, IndexError, TypeError):
        target = None
    if not isinstance(target, require_dspy(f"call '{module.name}'").Module):  # only sub-modules are called
        raise ModuleInputError(f"call '{module.name}': {type(root).__name__} has no sub-module '{path}'")
    return target


def at_path(root: Any, path: str) -> Any:
    """The object at ``path`` under ``root``: dotted public attributes, each with optional ``[i]`` indexes."""
    target = root
    for part in path.split("."):
        match = _PATH_PART.fullmatch(part)
        if match is None:
            raise AttributeError(part)
        target = getattr(target, match[1])
        for index in re.findall(r"\[(\d+)\]", match[2]):
            target = target[int(index)]
    return target


_PATH_PART = re.compile(r"([A-Za-z]\w*)((?:\[\d+\])*)")


# --- arguments and outputs -------------------------------------------------------------------------


def resolve_call_inputs(module: ModulePlan, upstream: dict[str, dict[str, Any]]) -> tuple[list[Any], dict[str, Any]]:
    """The call's positional and keyword arguments with references replaced by outputs."""
    inputs = module.inputs or {}
    resolve = functools.partial(_resolve, module, upstream)
    return [resolve(item) for item in inputs.get("args", [])], {k: resolve(v) for k, v in inputs.get("kwargs", {}).items()}


def _resolve(module: ModulePlan, upstream: dict[str, dict[str, Any]], value: Any) -> Any:
    if isinstance(value, list):
        return [_resolve(module, upstream, item) for item in value]
    if not isinstance(value, dict):
        return value
    if REF not in value:
        return {key: _resolve(module, upstream, item) for key, item in value.items()}
    source = upstream.get(value[REF])
    if source is None:
        raise ModuleInputError(f"call '{module.name}': call '{value[REF]}' produced no output")
    try:
        return output_value(source, value.get("field"))
    except (KeyError, TypeError):
        raise ModuleInputError(f"call '{module.name}': call '{value[REF]}' returned no field '{value.get('field')}' "
                               f"(fields: {', '.join(source) or 'none'})") from None


def output_value(output: dict[str, Any], field: str | None) -> Any:
    """What a call returned (a ``dspy.Prediction`` or a plain value), or one field of it."""
    if VALUE in output:
        whole = output[VALUE]
        return whole if field is None else whole[field]
    if field is not None:
        return output[field]
    import dspy  # optional dependency: a stored Prediction output means dspy ran it

    return dspy.Prediction(**output)


def call_output(module: ModulePlan, result: Any) -> dict[str, Any]:
    """A call's return value as a JSON-able output (a ModuleOutputError naming the field if not)."""
    import dspy  # optional dependency: only distributed dspy.Modules get here

    output = dict(result.toDict()) if isinstance(result, dspy.Prediction) else {VALUE: result}
    return normalize_output(module, output)
