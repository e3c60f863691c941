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
    return list(iter_refs(module.inputs or {}))


def module_parents(module: ModuleSpec) -> list[str]:
    """Modules this one depends on: referenced ones first, then ``depends_on``; no repeats."""
    names = [ref.source for ref in module_refs(module) if not ref.is_input]
    return list(dict.fromkeys([*names, *module.depends_on]))


def build_graph(spec: ProgramSpec) -> nx.DiGraph:
    """A DiGraph with an edge parent -> child for every dependency (unknown names included)."""
    graph = nx.DiGraph()
    graph.add_nodes_from(spec.modules)
    for name, module in spec.modules.items():
        graph.add_edges_from((parent, name) for parent in module_parents(module))
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
    problems += _cycle_problems(graph.subgraph(spec.modules))
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
        for key, value in (module.inputs or {}).items():
            problems += _check_refs(spec, iter_refs(value), f"module '{name}' input '{key}'")
        for parent in module.depends_on:
            if parent not in spec.modules:
                problems.append(f"module '{name}' depends_on unknown module '{parent}'{_known(spec)}")
    for key, value in (spec.outputs or {}).items():
        problems += _check_refs(spec, iter_refs(value), f"output '{key}'")
    return problems


def _check_refs(spec: ProgramSpec, refs: Iterable[Ref], where: str) -> list[str]:
    problems = []
    for ref in refs:
        if ref.is_input and ref.field not in spec.inputs:
            declared = ", ".join(spec.inputs) or "none"
            problems.append(
                f"{where} refers to {ref}, but the program has no input '{ref.field}' "
                f"(declared inputs: {declared})"
            )
        elif not ref.is_input and ref.source not in spec.modules:
            problems.append(f"{where} refers to unknown module '{ref.source}'{_known(spec)}")
    return problems


def _known(spec: ProgramSpec) -> str:
    return f" (modules: {', '.join(spec.modules)})"


def _cycle_problems(graph: nx.DiGraph) -> list[str]:
    problems = []
    for component in nx.strongly_connected_components(graph):
        sub = graph.subgraph(component)
        if len(component) > 1 or sub.has_edge(*(2 * list(component))):
            cycle = [edge[0] for edge in nx.find_cycle(sub)]
            problems.append("cycle: " + " -> ".join([*cycle, cycle[0]]))
    return sorted(problems)


def _uses_problems(modules: Mapping[str, ModuleSpec]) -> list[str]:
    problems = []
    for name, module in modules.items():
        try:
            resolve_uses(module.uses)
        except ImportError as exc:
            problems.append(f"module '{name}': uses '{module.uses}' cannot be resolved ({exc})")
    return problems


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
    if weights is None:
        return list(nx.dag_longest_path(graph, default_weight=1, topo_order=None))
    weighted = nx.DiGraph()
    weighted.add_nodes_from(graph)
    source, sink = "\0source", "\0sink"
    for node in graph:
        weighted.add_edge(source, node, weight=0.0)
        weighted.add_edge(node, sink, weight=float(weights.get(node, 0.0)))
    for parent, child in graph.edges:
        weighted.add_edge(parent, child, weight=float(weights.get(parent, 0.0)))
    path = nx.dag_longest_path(weighted, weight="weight")
    return [node for node in path if node not in (source, sink)]


def remaining_path_lengths(graph: nx.DiGraph, weights: Mapping[str, float] | None = None) -> dict[str, float]:
    """For each module, the length of the longest path from it to any sink (itself included)."""
    lengths: dict[str, float] = {}
    for node in reversed(list(nx.topological_sort(graph))):
        own = 1.0 if weights is None else float(weights.get(node, 0.0))
        lengths[node] = own + max((lengths[child] for child in graph.successors(node)), default=0.0)
    return lengths
