"""The program as a networkx DAG: semantic validation, dependency levels and critical path."""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterable, Mapping

import networkx as nx

from dspex_celery.errors import ProgramError
from dspex_celery.spec import NAME_PATTERN, RESERVED_NAMES, ModuleSpec, ProgramSpec, Ref, iter_refs

_NAME = re.compile(NAME_PATTERN)


def module_refs(module: ModuleSpec) -> list[Ref]:
    """The references of a module's inputs, in order."""
    return [ref for refs in module.input_refs.values() for ref in refs]


def module_parents(module: ModuleSpec) -> list[str]:
    """Modules this one depends on: referenced ones first, then ``depends_on``; no repeats."""
    names = [ref.source for ref in module_refs(module) if not ref.is_input]
    return list(dict.fromkeys([*names, *module.depends_on]))


def build_graph(spec: ProgramSpec) -> nx.DiGraph:
    """A DiGraph with an edge parent -> child for every dependency between known modules."""
    graph = nx.DiGraph()
    graph.add_nodes_from(spec.modules)
    graph.add_edges_from(
        (parent, name)
        for name, module in spec.modules.items()
        for parent in module_parents(module)
        if parent in spec.modules
    )
    return graph


def validate(spec: ProgramSpec, source: str = "program", *, resolve: bool = True) -> nx.DiGraph:
    """Check names, references, cycles and (optionally) that every ``uses`` imports.

    Raises one :class:`ProgramError` listing every problem found; returns the graph otherwise.
    """
    problems = [
        *_name_problems(spec),
        *_reference_problems(spec),
    ]
    graph = build_graph(spec)
    problems += _cycle_problems(graph)
    if resolve:
        problems += _uses_problems(spec.modules)
    if problems:
        raise ProgramError(problems, source)
    return graph


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


def _reference_problems(spec: ProgramSpec) -> list[str]:
    problems: list[str] = []
    for name, module in spec.modules.items():
        for key, refs in module.input_refs.items():
            problems += _check_refs(spec, refs, "module '{}' input '{}'", name, key)
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


def _cycle_problems(graph: nx.DiGraph) -> list[str]:
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
    failures: dict[str, str] = {}
    for uses in {module.uses for module in modules.values()}:
        try:
            resolve_uses(uses)
        except ImportError as exc:
            failures[uses] = str(exc)
    return [
        f"module '{name}': uses '{module.uses}' cannot be resolved ({failures[module.uses]})"
        for name, module in modules.items()
        if module.uses in failures
    ]


def resolve_uses(uses: str) -> Callable[..., object]:
    """Import ``package.module:attribute`` and return the attribute; ImportError when it fails."""
    module_path, _, attribute = uses.partition(":")
    try:
        target: object = importlib.import_module(module_path)
    except ImportError as exc:
        raise ImportError(f"cannot import '{module_path}': {exc}") from exc
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ImportError(f"'{module_path}' has no attribute '{attribute}'") from None
    if not callable(target):
        raise ImportError(f"'{uses}' is not callable")
    return target


# --- shape -----------------------------------------------------------------------------------------


def levels(graph: nx.DiGraph) -> list[list[str]]:
    """Dependency levels: every module sits one level below its deepest parent."""
    return [sorted(generation) for generation in nx.topological_generations(graph)]


def critical_path(graph: nx.DiGraph, weights: Mapping[str, float] | None = None) -> list[str]:
    """The longest chain of modules, by module count or by ``weights`` (e.g. observed seconds)."""
    return path_from_lengths(graph, remaining_path_lengths(graph, weights))


def path_from_lengths(graph: nx.DiGraph, lengths: Mapping[str, float]) -> list[str]:
    """Follow the longest remaining path from the best start (ties broken by name)."""
    starts = [node for node in graph if graph.in_degree(node) == 0]
    if not starts:
        return []
    node = min(starts, key=lambda n: (-lengths[n], n))
    path = [node]
    while children := list(graph.successors(node)):
        node = min(children, key=lambda n: (-lengths[n], n))
        path.append(node)
    return path


def remaining_path_lengths(graph: nx.DiGraph, weights: Mapping[str, float] | None = None) -> dict[str, float]:
    """For each module, the length of the longest path from it to any sink (itself included)."""
    lengths: dict[str, float] = {}
    for node in reversed(list(nx.topological_sort(graph))):
        own = 1.0 if weights is None else float(weights.get(node, 0.0))
        lengths[node] = own + max((lengths[child] for child in graph.successors(node)), default=0.0)
    return lengths
