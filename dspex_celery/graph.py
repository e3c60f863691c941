"""The program as a DAG: semantic validation, dependency levels and critical path.

Planning works on plain dicts: one pass over the references and one Kahn pass (:func:`validate`
returns a :class:`Dag`). networkx, imported on first use, words the cycles of an invalid program and serves the analyses of
recorded plans (:func:`critical_path` and :func:`remaining_path_lengths` over an ``nx.DiGraph``).
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

from dspex_celery.errors import ProgramError
from dspex_celery.spec import (
    ATOM_TYPES,
    NAME_PATTERN,
    RESERVED_NAMES,
    ModuleSpec,
    ProgramSpec,
    Ref,
    field_values,
    is_json,
    iter_refs,
    non_json_problems,
)

if TYPE_CHECKING:
    import networkx as nx

_NAME = re.compile(NAME_PATTERN)


@dataclass(frozen=True, slots=True)
class Dag:
    """The dependencies of a valid program: sorted parents and children, and dependency levels."""

    parents: dict[str, tuple[str, ...]]
    children: dict[str, tuple[str, ...]]
    levels: list[list[str]]

    @classmethod
    def build(cls, parents: Mapping[str, Collection[str]]) -> Dag | None:
        """The DAG of ``parents`` (module -> the distinct modules it depends on), or None when it
        has a cycle or names an unknown module. Levels are Kahn's generations, each sorted."""
        children: dict[str, list[str]] = {name: [] for name in parents}
        try:
            for name in sorted(parents):  # each module's children come out sorted
                for parent in parents[name]:
                    children[parent].append(name)
        except KeyError:
            return None
        waiting = {name: len(sources) for name, sources in parents.items()}
        level = [name for name, count in waiting.items() if not count]
        levels: list[list[str]] = []
        placed = 0
        while level:
            level.sort()
            levels.append(level)
            placed += len(level)
            ready = []
            for name in level:
                for child in children[name]:
                    left = waiting[child] - 1
                    waiting[child] = left
                    if not left:
                        ready.append(child)
            level = ready
        if placed < len(parents):
            return None
        return cls(
            {name: tuple(sorted(sources)) for name, sources in parents.items()},
            {name: tuple(names) for name, names in children.items()},
            levels,
        )

    def topological_order(self) -> list[str]:
        return [name for level in self.levels for name in level]

    def remaining_path_lengths(self, weights: Mapping[str, float] | None = None) -> dict[str, float]:
        """For each module, the length of the longest path from it to any sink (itself included)."""
        return _remaining(reversed(self.topological_order()), self.children, weights)

    def critical_path(self, lengths: Mapping[str, float]) -> list[str]:
        """The longest path by remaining ``lengths`` (of :meth:`remaining_path_lengths`)."""
        return _longest_path(self.levels[0] if self.levels else [], self.children, lengths)


# --- validation -------------------------------------------------------------------------------------


def validate(spec: ProgramSpec, source: str = "program", *, resolve: bool = True) -> Dag:
    """Check names, references, cycles, literals and (optionally) that every ``uses`` imports and takes
    its inputs.

    Raises one :class:`ProgramError` listing every problem found; returns the DAG otherwise. A
    valid program takes one pass; an invalid one is searched again to word each problem.
    """
    parents = _parents(spec) if _names_valid(spec) else None
    dag = Dag.build(parents) if parents is not None else None
    problems = [] if dag is not None else [*_name_problems(spec), *_value_problems(spec),
                                           *_reference_problems(spec), *_cycle_problems(_nx_graph(spec))]
    if resolve:
        problems += _uses_problems(spec.modules) + _compensate_problems(spec.modules)
    if problems:
        raise ProgramError(problems, source)
    if dag is None:  # the quick checks and the worded ones disagree: a bug, not a user error
        raise AssertionError(f"program '{spec.name}' failed validation without a problem to report")
    return dag


def _names_valid(spec: ProgramSpec) -> bool:
    """True when :func:`_name_problems` finds nothing (checked without wording anything)."""
    return (all(map(_NAME.match, spec.modules)) and RESERVED_NAMES.isdisjoint(spec.modules)
            and len(set(spec.inputs)) == len(spec.inputs))


def _parents(spec: ProgramSpec) -> dict[str, set[str]] | None:
    """Each module's parents (the modules it references or depends on), or None when a reference
    names an undeclared program input or an output names an unknown module. Modules that name
    unknown modules are left to :meth:`Dag.build`."""
    parents: dict[str, set[str]] = {}
    source_of = _plain_sources(spec.modules.values())
    for name, module in spec.modules.items():
        values = module.inputs.values() if module.inputs else ()
        if source_of is not None:  # the common case: only strings and numbers, looked up in C
            sources = set(map(source_of, values))
            sources.discard(_LITERAL)
        elif all(map(is_json, values)):
            sources = {ref.source for value in values for ref in iter_refs(value)}
        else:
            return None
        if module.with_ and not is_json(module.with_):
            return None
        if "inputs" in sources:
            if not all(ref.field in spec.inputs for value in values for ref in iter_refs(value) if ref.is_input):
                return None
            sources.discard("inputs")
        if module.depends_on:
            sources.update(module.depends_on)
        parents[name] = sources
    outputs = (spec.outputs or {}).values()
    if not all(map(is_json, outputs)) or any(_unknown(ref, spec) for value in outputs for ref in iter_refs(value)):
        return None
    return parents


#: What :func:`_source` makes of a literal (no module can be named so).
_LITERAL = "$"


def _plain_sources(modules: Collection[ModuleSpec]) -> Callable[[object], str] | None:
    """A lookup of what each input value of ``modules`` refers to (see :func:`_source`), computed once per
    distinct value (a module's output is read by several modules with the same string); None when some
    value is not a plain string or number (a list, a mapping, a str subclass: searched with ``iter_refs``)."""
    try:
        values = set(field_values(modules, "inputs"))
    except TypeError:  # an unhashable value: a list or a mapping
        return None
    if not ATOM_TYPES.issuperset(map(type, values)):
        return None
    return {value: _source(value) if type(value) is str else _LITERAL for value in values}.__getitem__


def _source(value: str) -> str:
    """What the string ``value`` refers to: ``$NAME.FIELD``: NAME (maybe "" or ``inputs``); a literal:
    :data:`_LITERAL`."""
    return value[1:].partition(".")[0] if value[:1] == "$" and value[1:2] != "$" else _LITERAL


def _unknown(ref: Ref, spec: ProgramSpec) -> bool:
    return ref.field not in spec.inputs if ref.is_input else ref.source not in spec.modules


def _name_problems(spec: ProgramSpec) -> list[str]:
    problems = []
    for name in spec.modules:
        if not _NAME.match(name):
            problems.append(
                f"invalid module name '{name}': use letters, digits and '_', not starting with a digit"
            )
        elif name in RESERVED_NAMES:
            problems.append(f"invalid module name '{name}': it is reserved for program inputs")
    duplicates = sorted({name for name in spec.inputs if spec.inputs.count(name) > 1})
    problems += [f"duplicate program input '{name}'" for name in duplicates]
    return problems


def _value_problems(spec: ProgramSpec) -> list[str]:
    """Literals that JSON cannot carry (a YAML date, a Python object) in inputs, ``with`` and outputs."""
    problems = []
    for name, module in spec.modules.items():
        for key, value in (module.inputs or {}).items():
            problems += non_json_problems(value, f"module '{name}' input '{key}'")
        for key, value in module.with_.items():
            problems += non_json_problems(value, f"module '{name}' with '{key}'")
    for key, value in (spec.outputs or {}).items():
        problems += non_json_problems(value, f"output '{key}'")
    return problems


def _reference_problems(spec: ProgramSpec) -> list[str]:
    problems: list[str] = []
    for name, module in spec.modules.items():
        for key, value in (module.inputs or {}).items():
            problems += _check_refs(spec, iter_refs(value), "module '{}' input '{}'", name, key)
        for parent in module.depends_on:
            if parent not in spec.modules:
                problems.append(f"module '{name}' depends_on unknown module '{parent}'{_known(spec)}")
    for key, value in (spec.outputs or {}).items():
        problems += _check_refs(spec, iter_refs(value), "output '{}'", key)
    return problems


def _check_refs(spec: ProgramSpec, refs: Iterable[Ref], where: str, *names: str) -> list[str]:
    """Problems of references (``where`` is formatted with ``names`` only when there is one)."""
    problems = []
    for ref in refs:
        if ref.is_input and ref.field not in spec.inputs:
            declared = ", ".join(spec.inputs) or "none"
            problems.append(
                f"{where.format(*names)} refers to {ref}, but the program has no input '{ref.field}' "
                f"(declared inputs: {declared})"
            )
        elif not ref.is_input and ref.source not in spec.modules:
            problems.append(f"{where.format(*names)} refers to unknown module '{ref.source}'{_known(spec)}")
    return problems


def _known(spec: ProgramSpec) -> str:
    return f" (modules: {', '.join(spec.modules)})"


def module_parents(module: ModuleSpec) -> list[str]:
    """Modules this one depends on: referenced ones first, then ``depends_on``; no repeats."""
    names = [ref.source for value in (module.inputs or {}).values() for ref in iter_refs(value) if not ref.is_input]
    return list(dict.fromkeys([*names, *module.depends_on]))


def _nx_graph(spec: ProgramSpec) -> nx.DiGraph:
    """A DiGraph with an edge parent -> child for every dependency between known modules."""
    import networkx as nx  # only an invalid program's cycles need it: planning does not import it

    graph = nx.DiGraph()
    graph.add_nodes_from(spec.modules)
    graph.add_edges_from(
        (parent, name)
        for name, module in spec.modules.items()
        for parent in module_parents(module)
        if parent in spec.modules
    )
    return graph


def _cycle_problems(graph: nx.DiGraph) -> list[str]:
    import networkx as nx

    if nx.is_directed_acyclic_graph(graph):
        return []
    problems = []
    for component in nx.strongly_connected_components(graph):
        sub = graph.subgraph(component)
        if len(component) > 1 or sub.has_edge(*(2 * list(component))):
            cycle = [edge[0] for edge in nx.find_cycle(sub)]
            problems.append("cycle: " + " -> ".join([*cycle, cycle[0]]))
    return sorted(problems)


def _uses_problems(modules: Mapping[str, ModuleSpec]) -> list[str]:
    """Modules whose ``uses`` does not import (or names what its package does not define), or whose
    inputs a plain function cannot take."""
    targets: dict[str, Callable[..., object]] = {}
    failures: dict[str, str] = {}
    for uses in {module.uses for module in modules.values()}:
        try:
            targets[uses] = resolve_uses(uses)
        except UsesRefused as exc:
            failures[uses] = f"is refused: {exc}"
        except ImportError as exc:
            failures[uses] = f"cannot be resolved ({exc})"
    problems = [f"module '{name}': uses '{module.uses}' {failures[module.uses]}"
                for name, module in modules.items() if module.uses in failures]
    checked = {uses: keywords for uses, target in targets.items()
               if inspect.isfunction(target) and not (keywords := _Keywords.of(target)).takes_anything}
    for name, module in modules.items() if checked else ():
        signature = checked.get(module.uses)
        if signature is not None and module.inputs is not None:  # without inputs, upstream outputs are merged in
            problems += signature.problems(name, module.uses, [*module.inputs, *module.with_])
    return problems


def _compensate_problems(modules: Mapping[str, ModuleSpec]) -> list[str]:
    """Modules whose ``compensate`` does not resolve (a method: ``uses`` is no class that has it), or
    cannot take ``inputs=`` and ``output=``."""
    problems = []
    for name, module in modules.items():
        compensate = module.compensate
        if compensate is None:
            continue
        try:
            target, given = _compensation(module, compensate)
        except ImportError as exc:
            problems.append(f"module '{name}': compensate '{compensate}' cannot be resolved ({exc})")
            continue
        keywords = _Keywords.of(target) if inspect.isfunction(target) else None
        if keywords is not None and keywords.problems(name, compensate, given):
            problems.append(f"module '{name}': compensate {compensate} must take the keywords inputs "
                            f"and output ({keywords.signature}): def undo(inputs, output)")
    return problems


def _compensation(module: ModuleSpec, compensate: str) -> tuple[object, tuple[str, ...]]:
    """What ``compensate`` names and the arguments it gets (a method also gets ``self``)."""
    if not is_method_name(compensate):
        return resolve_uses(compensate), COMPENSATE_KEYWORDS
    cls = resolve_uses(module.uses)
    method = inspect.getattr_static(cls, compensate, None) if inspect.isclass(cls) else None
    if not inspect.isfunction(method):
        raise ImportError(f"it names a method, but uses '{module.uses}' is not a class with a method "
                          f"'{compensate}'")
    return method, ("self", *COMPENSATE_KEYWORDS)


def is_method_name(compensate: str) -> bool:
    """``compensate`` names a method of the module's instance (no ``package.module:``)."""
    return ":" not in compensate


#: The keyword arguments a compensation is called with: the module's resolved inputs and its output.
COMPENSATE_KEYWORDS = ("inputs", "output")


@dataclass(frozen=True, slots=True)
class _Keywords:
    """What a plain function takes as keyword arguments (modules are called with keywords only)."""

    signature: str
    required: frozenset[str]
    accepted: frozenset[str] | None  # None: it takes any keyword (``**kwargs``)

    @classmethod
    def of(cls, function: Callable[..., object]) -> _Keywords:
        parameters = inspect.signature(function).parameters.values()
        by_keyword = [p for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        required = {p.name for p in parameters if p.default is p.empty
                    and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        open_ended = any(p.kind is p.VAR_KEYWORD for p in parameters)
        bare = inspect.Signature([p.replace(annotation=p.empty) for p in parameters])  # names, no annotations
        return cls(f"{function.__name__}{bare}", frozenset(required),
                   None if open_ended else frozenset(p.name for p in by_keyword))

    @property
    def takes_anything(self) -> bool:
        """Nothing required, any keyword accepted (``def f(**kwargs)``): no inputs can be wrong."""
        return not self.required and self.accepted is None

    def problems(self, module: str, uses: str, given: Iterable[str]) -> list[str]:
        names = set(given)
        lines = [f"module '{module}': {uses} needs input '{missing}' ({self.signature}): add it under inputs"
                 for missing in sorted(self.required - names)]
        if self.accepted is not None:
            lines += [f"module '{module}': {uses} takes no input '{extra}' ({self.signature}): remove it or rename it"
                      for extra in sorted(names - self.accepted)]
        return lines


class UsesRefused(ImportError):
    """``uses`` names something not *defined* in an allowed package (an import of it, a module, a dunder)."""


def resolve_uses(uses: str, allowed: Collection[str] | None = None) -> Callable[..., object]:
    """Import ``package.module:attribute`` and return the attribute; ImportError when it fails.

    Only objects defined in ``allowed`` packages resolve (default: the top-level package ``uses``
    imports from): the attribute path may not pass through a module or name a ``__dunder__``, and
    every object on it must have its ``__module__`` inside them (:class:`UsesRefused` otherwise), so
    what an allowed package merely imports (``os``, ``json.dumps``, a ``functools.partial``) is out.
    """
    module_path, _, attribute = uses.partition(":")
    packages = tuple(allowed) if allowed is not None else (module_path.partition(".")[0],)
    if not in_packages(module_path, packages):
        raise UsesRefused(f"'{module_path}' is outside the allowed packages ({_listed(packages)})")
    try:
        target: object = importlib.import_module(module_path)
    except ImportError as exc:
        raise ImportError(f"cannot import '{module_path}': {exc}") from exc
    parts = attribute.split(".")
    for index, part in enumerate(parts):
        if part.startswith("__"):
            raise UsesRefused(f"it names the special attribute '{part}' (uses may not name '__' attributes)")
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ImportError(f"'{module_path}' has no attribute '{attribute}'") from None
        _check_defined(".".join(parts[: index + 1]), ".".join(parts[index + 1:]), target, packages)
    if not callable(target):
        raise ImportError(f"'{uses}' is not callable")
    return target


def in_packages(module: str, packages: Iterable[str]) -> bool:
    """True when the dotted ``module`` is one of ``packages`` or below one."""
    return any(module == package or module.startswith(package + ".") for package in packages)


def package_of(uses: str) -> str:
    """The dotted Python module a ``uses`` string imports from."""
    return uses.partition(":")[0]


def is_allowed(uses: str, allowed: Iterable[str]) -> bool:
    """True when the module ``uses`` imports from is one of the allow-listed packages (or below one)."""
    return in_packages(package_of(uses), allowed)


def _check_defined(path: str, rest: str, target: object, packages: tuple[str, ...]) -> None:
    """:class:`UsesRefused` unless ``target`` (at attribute ``path``, ``rest`` to go) is defined in ``packages``."""
    if isinstance(target, ModuleType):
        hint = f" ('{target.__name__}:{rest}')" if rest else ""
        raise UsesRefused(f"it passes through the module '{target.__name__}' ({path}): put the module "
                          f"before ':'{hint}; uses may name only what an allowed package defines")
    defined_in = getattr(target, "__module__", None)
    if not isinstance(defined_in, str) or not in_packages(defined_in, packages):
        where = f"defined in '{defined_in}'" if isinstance(defined_in, str) else "a built-in"
        raise UsesRefused(f"{path} is {where}, not in {_listed(packages)}: uses may name only functions and "
                          "classes (and their methods) defined in an allowed package, not what it imports")


def _listed(packages: Collection[str]) -> str:
    return ", ".join(f"'{package}'" for package in packages) or "none"


# --- shape of a recorded plan (networkx) ------------------------------------------------------------


def critical_path(graph: nx.DiGraph, weights: Mapping[str, float] | None = None) -> list[str]:
    """The longest chain of modules, by module count or by ``weights`` (e.g. observed seconds)."""
    starts = [node for node in graph if graph.in_degree(node) == 0]
    return _longest_path(starts, graph.succ, remaining_path_lengths(graph, weights))


def remaining_path_lengths(graph: nx.DiGraph, weights: Mapping[str, float] | None = None) -> dict[str, float]:
    """For each module, the length of the longest path from it to any sink (itself included)."""
    import networkx as nx

    return _remaining(reversed(list(nx.topological_sort(graph))), graph.succ, weights)


def _remaining(
    order: Iterable[str], children: Mapping[str, Iterable[str]], weights: Mapping[str, float] | None
) -> dict[str, float]:
    """Remaining path lengths, visiting modules children first (reverse topological ``order``)."""
    lengths: dict[str, float] = {}
    for node in order:
        own = 1.0 if weights is None else float(weights.get(node, 0.0))
        below = children[node]  # max(..., default=) would cost a keyword call per module
        lengths[node] = own + max(map(lengths.__getitem__, below)) if below else own
    return lengths


def _longest_path(
    starts: Collection[str], children: Mapping[str, Collection[str]], lengths: Mapping[str, float]
) -> list[str]:
    """Follow the longest remaining path from the best start (ties broken by name)."""
    def best(nodes: Iterable[str]) -> str:
        return min(nodes, key=lambda node: (-lengths[node], node))

    if not starts:
        return []
    path = [best(starts)]
    while children[path[-1]]:
        path.append(best(children[path[-1]]))
    return path
