"""``Program``: a program built in Python or loaded from a file, validated on demand.

Running one is the client's job: :meth:`Program.forward` calls ``Program.runner``, which the DSPy
integration (:mod:`dspex_celery.integrations.dspy`) installs, so this module imports no client.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, Protocol, Self

from dspex_celery.errors import ProgramError, UsageError
from dspex_celery.graph import package_of
from dspex_celery.integrations.dspy_plan import module_reference, spec_factories
from dspex_celery.plan import Plan, build_plan
from dspex_celery.spec import ATOM_TYPES, ProgramSpec, field_values, load_program_file, parse_program


#: A run option (not a ``submit_program`` keyword) for the runner: a callable given, once the execution
#: succeeded, ``read(module) -> trace entries`` of its dspy modules (the workers kept their DSPy traces).
TRACE_OPTION = "on_dspy_trace"


class ProgramRunner(Protocol):
    """Runs ``program`` on ``inputs`` with ``submit_program`` keywords (and :data:`TRACE_OPTION`) and
    returns its prediction."""

    def __call__(self, program: Program, inputs: dict[str, Any], options: Mapping[str, Any]) -> Any: ...


class ProgramAsyncRunner(Protocol):
    """:class:`ProgramRunner`, awaited: submits and waits without blocking the event loop."""

    async def __call__(self, program: Program, inputs: dict[str, Any], options: Mapping[str, Any]) -> Any: ...


class Program:
    """A DAG of modules. Build it with :meth:`add_module` or load it with :meth:`from_file`."""

    #: Folder that relative ``state:`` paths are resolved against: the program file's, else the cwd.
    base_dir: Path | None = None
    #: ``submit_program`` keywords used by :meth:`forward` (set with :meth:`using`).
    run_options: Mapping[str, Any] = MappingProxyType({})
    #: What :meth:`forward` runs the program with (installed by ``dspex_celery.integrations.dspy``).
    runner: ClassVar[ProgramRunner | None] = None
    #: What :meth:`arun` runs it with (installed by ``dspex_celery.integrations.dspy`` too).
    async_runner: ClassVar[ProgramAsyncRunner | None] = None

    def __init__(self, name: str, inputs: list[str] | tuple[str, ...] = (), **keys: Any) -> None:
        #: The program data that :meth:`add_module` edits; None when it is :attr:`_spec`'s (see :meth:`_edited`).
        self._data: dict[str, Any] | None = {"name": name, "inputs": list(inputs), "modules": {}, **keys}
        self.source = name
        self._spec: ProgramSpec | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "program") -> Self:
        """The program ``data`` describes. ``data`` is not kept: changing it later leaves the program as
        it was (valid data is parsed now, into containers of its own; invalid data is copied, and
        :attr:`spec` raises its problems)."""
        program = cls.__new__(cls)
        program.source = source
        try:
            program._spec = _detached(parse_program(data, source))
            program._data = None
        except ProgramError:
            program._spec = None
            program._data = _copy(data)
        return program

    @classmethod
    def from_file(cls, path: str | Path) -> Self:
        program = cls.from_dict(load_program_file(path), source=str(path))
        program.base_dir = Path(path).resolve().parent
        return program

    @classmethod
    def coerce(cls, value: Program | ProgramSpec | dict[str, Any] | str | Path) -> Program:
        """A Program from a Program, a spec, a mapping or a path to a program file."""
        if isinstance(value, Program):
            return value
        if isinstance(value, ProgramSpec):
            return cls.from_dict(value.to_dict(), source=value.name)
        if isinstance(value, dict):
            return cls.from_dict(value)
        return cls.from_file(value)

    def add_module(
        self,
        name: str,
        uses: str | Any,
        *,
        inputs: dict[str, Any] | None = None,
        depends_on: list[str] | tuple[str, ...] = (),
        resource: str | None = None,
        **options: Any,
    ) -> Self:
        """Add a module (``options`` are other module keys: ``with_``, ``retry``, ``timeout_s``).

        ``uses`` may be a ``dspy.Module`` instance of an importable class: its state is saved as
        JSON under ``state_dir=`` (default ``.dspex/state``) and workers rebuild it with ``with_``.
        """
        if not isinstance(uses, str):
            uses, options = module_reference(name, uses, options)
        module: dict[str, Any] = {"uses": uses, "depends_on": list(depends_on)}
        if inputs is not None:
            module["inputs"] = inputs
        if resource is not None:
            module["resource"] = resource
        if "with_" in options:
            options["with"] = options.pop("with_")
        module.update(options)
        self._edited().setdefault("modules", {})[name] = module
        self._spec = None
        return self

    def set_outputs(self, outputs: dict[str, Any]) -> Self:
        self._edited()["outputs"] = outputs
        self._spec = None
        return self

    @property
    def name(self) -> str:
        if self._data is None:
            return self.spec.name
        return str(self._data.get("name", self.source))

    @property
    def spec(self) -> ProgramSpec:
        """The validated schema model (raises ProgramError listing every problem)."""
        if self._spec is None:
            self._spec = parse_program(self._edited(), self.source)
        return self._spec

    def _edited(self) -> dict[str, Any]:
        """The program data to edit or parse: this program's own (a parsed one's is dumped from its spec
        when first needed)."""
        if self._data is None:
            self._data = self.spec.model_dump(by_alias=True, exclude_none=True)  # fresh containers throughout
        return self._data

    def plan(self, *, resolve: bool = True, **hints: Any) -> Plan:
        """Validate the program completely and flatten it into a plan."""
        return build_plan(self.spec, source=self.source, resolve=resolve, base_dir=self.base_dir, **hints)

    def packages(self) -> set[str]:
        """The Python packages whose modules (and DSPy LM/adapter factories) this program calls."""
        uses = [module.uses for module in self.spec.modules.values()] + spec_factories(self.spec)
        return {package_of(path) for path in uses}

    def using(self, **options: Any) -> Self:
        """How :meth:`forward` runs: ``submit_program`` keywords (``app``, ``strategy``, ``timeout``)."""
        self.run_options = MappingProxyType({**self.run_options, **options})
        return self

    def forward(self, **inputs: Any) -> Any:
        """Run the program like a DSPy module and return a ``dspy.Prediction`` of its outputs.

        Embedded (in-process) unless :meth:`using` or ``DSPEX_*`` settings name a cluster; a failed
        execution raises :class:`~dspex_celery.errors.ExecutionFailed`.
        """
        return self.run(inputs)

    def run(self, inputs: dict[str, Any]) -> Any:
        """:meth:`forward` with its inputs as one mapping: runs :meth:`runnable` through ``Program.runner``."""
        runner = type(self).runner
        if runner is None:
            raise _no_runner()
        return runner(self.runnable(), inputs, self.options_for_run())

    async def arun(self, inputs: dict[str, Any]) -> Any:
        """:meth:`run`, awaited: the event loop goes on while the execution runs (``Program.async_runner``)."""
        runner = type(self).async_runner
        if runner is None:
            raise _no_runner()
        return await runner(self.runnable(), inputs, self.options_for_run())

    def options_for_run(self) -> Mapping[str, Any]:
        """The runner's options for a run starting now: :attr:`run_options` (a DSPy ``Program`` adds
        :data:`TRACE_OPTION` under an active DSPy trace)."""
        return self.run_options

    def runnable(self) -> Program:
        """The program that :meth:`run` submits: this one (a DSPy ``Program`` adds its compiled state)."""
        return self

    def __call__(self, **inputs: Any) -> Any:
        return self.forward(**inputs)

    def to_dict(self) -> dict[str, Any]:
        return self.spec.to_dict()


def _no_runner() -> UsageError:
    return UsageError("Program.forward: no runner is installed: import Program from dspex_celery "
                      "(or import dspex_celery.integrations.dspy)")




def _detached(spec: ProgramSpec) -> ProgramSpec:
    """``spec`` with copies of the containers it shares with the data it was parsed from: validation
    builds its own mappings, but a list or mapping *value* (of an input, a ``with`` key or an output)
    is the caller's until copied."""
    modules = spec.modules.values()
    for field in ("inputs", "with_"):
        if not ATOM_TYPES.issuperset(map(type, field_values(modules, field))):
            for module in modules:
                _copy_values(getattr(module, field) or {})
    if spec.outputs and not ATOM_TYPES.issuperset(map(type, spec.outputs.values())):
        _copy_values(spec.outputs)
    return spec


def _copy_values(values: dict[str, Any]) -> None:
    """Replace each value of ``values`` (the spec's own mapping) that is not an atom by a copy of it."""
    for key, value in values.items():
        if type(value) not in ATOM_TYPES:
            values[key] = _copy(value)


def _copy(value: Any) -> Any:
    """A deep copy of program data: dicts and lists of plain values quickly, anything else by deepcopy."""
    kind = type(value)
    if kind is dict:
        return {key: item if type(item) in ATOM_TYPES else _copy(item) for key, item in value.items()}
    if kind is list:
        return [item if type(item) in ATOM_TYPES else _copy(item) for item in value]
    return value if kind in ATOM_TYPES else copy.deepcopy(value)
