"""``Program`` as a ``dspy.Module`` (API floor): what ``dspex_celery.Program`` is when dspy is installed.

DSPy's own tools take a :class:`DspyProgram` like any module: ``program(...)`` / ``acall`` /
``batch`` / ``dspy.Evaluate`` run it through ``Program.runner`` (the client: embedded, or on the
cluster), and optimizers see its predictors.

- Its predictors are those of local instances of its ``dspy.Module`` modules, built on first use
  from ``uses`` and ``with:`` and loaded with ``state:``; ``dump_state``/``save`` name them
  ``MODULE.PATH`` (``generate.respond.predict``).
- A module whose state changed since it was built (an optimizer set demos or instructions) runs
  with that state: saved once as JSON under ``state_dir`` (named by its content) and given to the
  workers as the module's ``state:``, as ``add_module`` of an instance does.
- Run under an active DSPy trace (BootstrapFewShot), the workers keep each dspy module's trace and
  it is appended to the caller's ``dspy.settings.trace`` with the local predictors (bootstrapped demos).

Imported only when dspy is installed (``dspex_celery.integrations.dspy`` checks): the core works
without the ``[dspy]`` extra.
"""

from __future__ import annotations

import copy
import functools
import json
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Self

import dspy  # optional dependency (the [dspy] extra): this module is imported only when it is installed

from dspex_celery.errors import UsageError
from dspex_celery.graph import resolve_uses
from dspex_celery.integrations.dspy_plan import DEFAULT_STATE_DIR, module_reference
from dspex_celery.integrations.dspy_worker import append_trace
from dspex_celery.plan import ModulePlan
from dspex_celery.program import TRACE_OPTION, Program

#: Attributes a copy rebuilds itself instead of deep-copying (``run_options`` is shared: it holds the app).
_OWN_ATTRIBUTES = frozenset({"_data", "_spec", "_instances", "_baseline", "_saved", "_lock", "run_options"})


class DspyProgram(Program, dspy.Module):
    """A :class:`~dspex_celery.program.Program` that is also a ``dspy.Module``."""

    #: Where compiled module state is saved for the workers (relative to the cwd; workers need the files).
    state_dir: Path = DEFAULT_STATE_DIR

    __call__ = dspy.Module.__call__  # callbacks, usage tracking, then forward()

    def __init__(self, name: str, inputs: list[str] | tuple[str, ...] = (), **keys: Any) -> None:
        Program.__init__(self, name, inputs, **keys)
        self._init_module()

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "program") -> Self:
        program = super().from_dict(data, source)
        program._init_module()
        return program

    def _init_module(self) -> None:
        dspy.Module._base_init(self)  # what dspy.Module's metaclass does before __init__
        self._instances: dict[str, Any] | None = None
        self._baseline: dict[str, str] = {}  # each instance's state when built
        self._saved: dict[tuple[str, str], str | None] = {}  # (module, state) -> its state file
        self._lock = threading.Lock()

    def add_module(self, name: str, uses: str | Any, **keys: Any) -> Self:
        """As :meth:`Program.add_module`; the local module instances are built anew (state set on them is dropped)."""
        super().add_module(name, uses, **keys)
        self._instances = None
        return self

    def set_outputs(self, outputs: dict[str, Any]) -> Self:
        super().set_outputs(outputs)
        self._instances = None
        return self

    # --- what DSPy's optimizers see -----------------------------------------------------------------

    def dspy_modules(self) -> dict[str, Any]:
        """Local instances of the program's ``dspy.Module`` modules, by module name (built once)."""
        with self._lock:
            if self._instances is None:
                modules = self.plan().modules.values()
                instances = {module.name: _build(module) for module in modules if _is_dspy_class(module.uses)}
                self._baseline = {name: _state_key(instance) for name, instance in instances.items()}
                self._instances = instances
            return self._instances

    def named_parameters(self) -> list[tuple[str, Any]]:
        """The parameters (``dspy.Predict`` modules) of its dspy modules, named ``MODULE.PATH``."""
        return [(f"{name}.{path}", parameter) for name, instance in self.dspy_modules().items()
                for path, parameter in instance.named_parameters()]

    def deepcopy(self) -> Self:
        return copy.deepcopy(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> Self:
        clone = type(self).from_dict(self._edited(), self.source)
        clone.run_options = self.run_options
        for key, value in self.__dict__.items():
            if key not in _OWN_ATTRIBUTES:
                setattr(clone, key, copy.deepcopy(value, memo))
        with self._lock:
            if self._instances is not None:
                clone._instances = {name: instance.deepcopy() for name, instance in self._instances.items()}
                clone._baseline = dict(self._baseline)
                clone._saved = dict(self._saved)
        return clone

    def __repr__(self) -> str:
        return f"Program({self.name!r})"

    # --- running it ---------------------------------------------------------------------------------

    def options_for_run(self) -> Mapping[str, Any]:
        """:attr:`run_options`; under an active DSPy trace (BootstrapFewShot) also the hook that adds the
        workers' traces of its dspy modules to it, with this program's own predictors."""
        trace = dspy.settings.trace
        if trace is None:
            return self.run_options
        return {**self.run_options, TRACE_OPTION: functools.partial(self._add_traces, trace)}

    def _add_traces(self, trace: list[Any], read: Callable[[str], list[list[Any]]]) -> None:
        for name, instance in self.dspy_modules().items():
            append_trace(trace, dict(instance.named_predictors()), read(name))

    async def aforward(self, **inputs: Any) -> Any:
        """``await program.acall(...)``: the event loop goes on while the execution runs."""
        return await self.arun(inputs)

    def runnable(self) -> Program:
        """This program, or a copy whose modules with changed (compiled) state name that state's file."""
        with self._lock:
            instances = dict(self._instances or {})
        changed = {name: key for name, instance in instances.items()
                   if (key := _state_key(instance)) != self._baseline[name]}
        if not changed:
            return self
        data = copy.deepcopy(self._edited())
        for name, key in changed.items():
            module = data["modules"][name]
            state = self._state_file(name, key, instances[name], module.get("with", {}))
            if state is None:
                module.pop("state", None)
            else:
                module["state"] = state
        program = Program.from_dict(data, self.source)
        program.base_dir = self.base_dir
        return program

    def _state_file(self, name: str, key: str, instance: Any, with_: dict[str, Any]) -> str | None:
        """The JSON file of ``instance``'s state (None: a fresh instance has it), saved once per state."""
        with self._lock:
            if (name, key) not in self._saved:
                _, options = module_reference(name, instance, {"with_": with_, "state_dir": self.state_dir})
                self._saved[(name, key)] = options.get("state")
            return self._saved[(name, key)]


def _is_dspy_class(uses: str) -> bool:
    target = resolve_uses(uses)
    return isinstance(target, type) and issubclass(target, dspy.Module)


def _build(module: ModulePlan) -> Any:
    """``Class(**with_)`` loaded with ``state:``, as a worker builds it."""
    try:
        instance: Any = resolve_uses(module.uses)(**module.with_)
        if module.state is not None:
            instance.load(module.state)
    except Exception as exc:  # the user's constructor or state file may raise anything
        raise UsageError(
            f"module '{module.name}': cannot build {module.uses}(**{module.with_!r}) here "
            f"({type(exc).__name__}: {exc}): DSPy's tools need its dspy.Module in this process too"
        ) from None
    return instance


def _state_key(instance: Any) -> str:
    return json.dumps(instance.dump_state(), sort_keys=True, default=str)
