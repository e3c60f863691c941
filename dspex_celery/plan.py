"""The plan: a validated program flattened into what workers need, serialisable as JSON.

The plan is written once per execution to the state store; task messages carry only the
execution id and a module name, so their size does not grow with the program.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from dspex_celery import defaults
from dspex_celery.collector import without_collection
from dspex_celery.errors import ProgramError
from dspex_celery.graph import Dag, validate
from dspex_celery.integrations.dspy_plan import (
    dspy_plan_problems,
    dspy_settings,
    state_path,
    with_dspy_hint,
)
from dspex_celery.spec import (
    BreakerPolicy,
    ModuleSpec,
    ProgramSpec,
    RetryPolicy,
    Threshold,
)


@dataclass(slots=True)
class ModulePlan:
    """Everything a worker needs to run one module.

    Read-only by convention (workers share cached plans between threads), but not ``frozen``: a frozen
    dataclass's ``__init__`` costs five times as much, and a 1000-module plan builds 1000 of them on
    every submission and on every worker that loads it.
    """

    name: str
    uses: str
    inputs: dict[str, Any] | None
    depends_on: tuple[str, ...]
    parents: tuple[str, ...]
    children: tuple[str, ...]
    resource: str
    level: int
    priority: float
    with_: dict[str, Any] = field(default_factory=dict)
    state: str | None = None
    timeout_s: float | None = None
    retry: dict[str, Any] = field(default_factory=dict)
    circuit_breaker: dict[str, Any] = field(default_factory=dict)
    dspy: dict[str, str] = field(default_factory=dict)
    #: None: ``timeout_s`` is the program's own (or unset); else where the learned one came from and
    #: how to turn it off, for the ModuleTimeout message.
    timeout_source: str | None = None
    #: Seconds after which a still-running attempt gets a backup attempt (None: never; see backups.py).
    backup_after_s: float | None = None
    #: ``package.module:function`` that undoes the module's side effects (None: nothing to undo).
    compensate: str | None = None

    def overran(self) -> str:
        """What a ModuleTimeout says: the module, its ``timeout_s``, and where a learned one came from."""
        if self.timeout_source is None:
            return f"module '{self.name}' ran longer than its timeout_s ({self.timeout_s or 0:g} s)"
        return (f"module '{self.name}' ran longer than its learned timeout_s {self.timeout_s or 0:g} s "
                f"({self.timeout_source})")

    @property
    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy.model_validate(self.retry)

    @property
    def breaker_policy(self) -> BreakerPolicy:
        return BreakerPolicy.model_validate(self.circuit_breaker)


@dataclass(frozen=True, slots=True)
class Plan:
    """A program ready to dispatch: modules, levels, outputs and tolerance."""

    program: str
    fingerprint: str
    inputs: tuple[str, ...]
    modules: dict[str, ModulePlan]
    levels: list[list[str]]
    outputs: dict[str, Any]
    critical_path: list[str]
    failure_tolerance: str | int
    max_priority: float = 1.0

    @property
    def width(self) -> int:
        return max(len(level) for level in self.levels)

    @property
    def sinks(self) -> list[str]:
        return [name for name, module in self.modules.items() if not module.children]

    def topological_order(self) -> list[str]:
        return [name for level in self.levels for name in level]

    def urgency(self, name: str) -> float:
        """0..1: the module's longest remaining path relative to the program's longest."""
        return self.modules[name].priority / self.max_priority

    def max_failures(self) -> int | None:
        """How many failed modules are tolerated before the execution fails (None: unlimited)."""
        if self.failure_tolerance == "strict":
            return 0
        if self.failure_tolerance == "tolerant":
            return None
        return int(self.failure_tolerance)

    def to_json(self) -> str:
        """The plan as compact JSON with sorted keys (:func:`plan_text` keeps it, with its digest)."""
        data = _fields(self)
        data["modules"] = {name: _fields(module) for name, module in self.modules.items()}
        return canonical_json(data).decode()

    @classmethod
    @without_collection
    def from_json(cls, text: str | bytes) -> Plan:
        data = orjson.loads(text)
        modules = data["modules"]
        for name, module in modules.items():  # freshly parsed: its lists become tuples in place
            for key in _TUPLE_FIELDS:
                module[key] = tuple(module[key])
            modules[name] = ModulePlan(**module)
        data["inputs"] = tuple(data["inputs"])
        return cls(**data)

    def describe(self, strategy: str) -> dict[str, Any]:
        """The shape of the plan, as ``dspex-celery plan --json`` prints it."""
        return {
            "program": self.program,
            "fingerprint": self.fingerprint,
            "strategy": strategy,
            "modules": len(self.modules),
            "depth": len(self.levels),
            "width": self.width,
            "levels": self.levels,
            "critical_path": self.critical_path,
        }


#: ModulePlan fields that are tuples (JSON gives lists).
_TUPLE_FIELDS = ("depends_on", "parents", "children")


def _fields(instance: Plan | ModulePlan) -> dict[str, Any]:
    """A dataclass's fields as a mapping, values as they are (JSON encodes tuples as lists)."""
    return {name: getattr(instance, name) for name in instance.__slots__}


def canonical_json(value: Any) -> bytes:
    """Compact JSON with sorted keys: the same bytes for the same content."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
    except orjson.JSONEncodeError:  # an integer beyond 64 bits: the standard library encodes any
        return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


#: Program keys that say how to run it, not what it computes: opting in to learned timeouts keeps the
#: fingerprint, so the profile it opts in to is still found.
_NOT_CONTENT = frozenset({"timeouts"})


def fingerprint(spec: ProgramSpec) -> str:
    """A stable hash of the program's content: equal programs, equal fingerprints (whatever the order
    of their keys, and whether unset keys are left out or written as null)."""
    try:  # a Python-mode dump is ~20% quicker and encodes the same (validation let only JSON values in)
        text = orjson.dumps(_content(spec.model_dump(by_alias=True, exclude_none=True)),
                            option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
    except orjson.JSONEncodeError:  # an integer beyond 64 bits: canonical_json of the JSON-mode dump
        text = canonical_json(_content(spec.to_dict()))
    return hashlib.sha256(text).hexdigest()[:16]


def _content(dumped: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in dumped.items() if key not in _NOT_CONTENT}


@without_collection
def build_plan(
    spec: ProgramSpec,
    *,
    source: str = "program",
    resolve: bool = True,
    weights: dict[str, float] | None = None,
    learned_timeouts: Mapping[str, float] | None = None,
    timeout_sources: Mapping[str, str] | None = None,
    base_dir: Path | None = None,
    learned_backups: Mapping[str, float] | None = None,
) -> Plan:
    """Validate ``spec`` and flatten it into a :class:`Plan`.

    ``weights`` (observed seconds per module) make priorities and the critical path
    duration-based; ``learned_timeouts`` fill ``timeout_s`` where the program sets none, and
    ``timeout_sources`` say where each came from (``ModulePlan.timeout_source``);
    relative ``state:`` paths are made absolute against ``base_dir`` (the program file's folder);
    ``learned_backups`` fill ``backup_after_s`` where the program sets none (and ``backup`` is not false).
    """
    try:
        dag = validate(spec, source, resolve=resolve)
    except ProgramError as exc:
        raise with_dspy_hint(exc, spec) from None
    priorities = dag.remaining_path_lengths(weights)
    shared = _Shared.of(spec, learned_timeouts or {}, timeout_sources or {}, base_dir, learned_backups or {})
    level_of = {name: index for index, level in enumerate(dag.levels) for name in level}
    modules = {
        name: _module_plan(spec, name, module, dag, level_of[name], priorities[name], shared)
        for name, module in spec.modules.items()
    }
    if resolve and (problems := dspy_plan_problems(modules)):
        raise ProgramError(problems, source)
    return Plan(
        program=spec.name,
        fingerprint=fingerprint(spec),
        inputs=spec.inputs,
        modules=modules,
        levels=dag.levels,
        outputs=_outputs(spec, dag),
        critical_path=dag.critical_path(priorities),
        failure_tolerance=_tolerance(spec),
        max_priority=max(priorities.values(), default=1.0) or 1.0,
    )


@dataclass(frozen=True, slots=True)
class _Shared:
    """What every module's plan takes from the program: defaults, dumped once for all to share."""

    retry: dict[str, Any]
    circuit_breaker: dict[str, Any]
    resource: str
    timeout_s: float | None
    learned_timeouts: Mapping[str, float]
    timeout_sources: Mapping[str, str]
    base_dir: Path | None
    learned_backups: Mapping[str, float]

    @classmethod
    def of(cls, spec: ProgramSpec, learned_timeouts: Mapping[str, float], timeout_sources: Mapping[str, str],
           base_dir: Path | None, learned_backups: Mapping[str, float]) -> _Shared:
        chosen = spec.defaults
        return cls(
            retry=(chosen.retry or RetryPolicy()).model_dump(mode="json"),
            circuit_breaker=(chosen.circuit_breaker or BreakerPolicy()).model_dump(mode="json"),
            resource=chosen.resource or defaults.RESOURCE,
            timeout_s=chosen.timeout_s,
            learned_timeouts=learned_timeouts,
            timeout_sources=timeout_sources,
            base_dir=base_dir,
            learned_backups=learned_backups,
        )


def _module_plan(
    spec: ProgramSpec, name: str, module: ModuleSpec, dag: Dag, level: int, priority: float, shared: _Shared
) -> ModulePlan:
    own_timeout = module.timeout_s or shared.timeout_s
    learned = None if own_timeout or not shared.learned_timeouts else shared.learned_timeouts.get(name)
    # Positional, in field order: 18 keywords cost a 1000-module plan ~1.5 ms more (tests/test_planner.py
    # checks this order against the fields).
    return ModulePlan(
        name,
        module.uses,
        module.inputs,
        module.depends_on,
        dag.parents[name],
        dag.children[name],
        module.resource or shared.resource,
        level,
        priority,
        dict(module.with_),
        None if module.state is None else state_path(module.state, shared.base_dir),
        own_timeout or learned,
        module.retry.model_dump(mode="json") if module.retry else shared.retry,
        module.circuit_breaker.model_dump(mode="json") if module.circuit_breaker else shared.circuit_breaker,
        {} if module.dspy is None and spec.dspy is None else dspy_settings(spec, module),
        None if learned is None else shared.timeout_sources.get(name, "from optimize"),
        None if module.backup is False else module.backup_after_s or shared.learned_backups.get(name),
        module.compensate,
    )


def plan_digest(text: str) -> str:
    """A short digest of a plan's stored text: task messages carry it, so a worker that already parsed
    that text (another execution of the same plan: a batch's lines) need not read it again."""
    return hashlib.blake2b(text.encode(), digest_size=10).hexdigest()


def plan_text(plan: Plan) -> tuple[str, str]:
    """The plan's JSON text to store and its :func:`plan_digest` (remembered: :func:`known_digest`)."""
    text = plan.to_json()
    digest = plan_digest(text)
    remember_digest(plan, digest)
    return text, digest


def known_digest(plan: Plan) -> str | None:
    """The digest of the text ``plan`` was stored as or parsed from, if this process knows it."""
    entry = _DIGESTS.get(id(plan))
    return entry[1] if entry is not None and entry[0] is plan else None


def remember_digest(plan: Plan, digest: str) -> None:
    """Record that ``plan`` was stored as, or parsed from, a text of digest ``digest``."""
    if len(_DIGESTS) >= _DIGESTS_BOUND:
        _DIGESTS.clear()
    _DIGESTS[id(plan)] = (plan, digest)


#: The digests of the plans seen lately, by identity (with the plan itself, so an id is never reused).
_DIGESTS: dict[int, tuple[Plan, str]] = {}
_DIGESTS_BOUND = 1024


def _outputs(spec: ProgramSpec, dag: Dag) -> dict[str, Any]:
    if spec.outputs is not None:
        return dict(spec.outputs)
    return {name: f"${name}" for name in spec.modules if not dag.children[name]}


def _tolerance(spec: ProgramSpec) -> str | int:
    tolerance = spec.failure_tolerance
    return tolerance.threshold if isinstance(tolerance, Threshold) else tolerance
