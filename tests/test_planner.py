"""The planner's plain-dict DAG against networkx, and validation's quick checks against its wording."""

from __future__ import annotations

import gc
import json
import random
from enum import StrEnum
from typing import Any

import networkx as nx
import pytest
from celery import Celery, chord

from dspex_celery import Program, ProgramError
from dspex_celery.canvas import (
    RUN_MODULE,
    hard_time_limit,
    module_signature,
    stage_signature,
)
from dspex_celery.examples import synthetic
from dspex_celery.graph import Dag
from dspex_celery.plan import Plan

ADD = "tests.modules.basic:add"
ECHO = "tests.modules.basic:echo"


def shuffled(data: dict[str, Any], seed: int) -> dict[str, Any]:
    """The program with its modules listed in a random (not topological) order."""
    items = list(data["modules"].items())
    random.Random(seed).shuffle(items)
    return {**data, "modules": dict(items)}


PROGRAMS = {
    "layered": synthetic.layered(12, 5),
    "fan_out": synthetic.fan_out(20),
    "chain": synthetic.chain(40),
    "random": synthetic.random_dag(120, seed=3),
    "dense": synthetic.dense_dag(300, seed=2),
    "dense shuffled": shuffled(synthetic.dense_dag(300, seed=2), seed=5),
    "random shuffled": shuffled(synthetic.random_dag(120, seed=4), seed=6),
}


def nx_graph(data: dict[str, Any]) -> nx.DiGraph:
    """The program's graph built independently of the planner (synthetic modules read `$parent.value`)."""
    graph = nx.DiGraph()
    graph.add_nodes_from(data["modules"])
    for name, module in data["modules"].items():
        for key, value in module.get("inputs", {}).items():
            if key.startswith("p_"):
                graph.add_edge(value[1:].partition(".")[0], name)
    return graph


def remaining(graph: nx.DiGraph, weights: dict[str, float] | None = None) -> dict[str, float]:
    """Reference: the longest path from each node to a sink, itself included."""
    lengths: dict[str, float] = {}
    for node in reversed(list(nx.topological_sort(graph))):
        own = 1.0 if weights is None else weights.get(node, 0.0)
        lengths[node] = own + max((lengths[child] for child in graph.successors(node)), default=0.0)
    return lengths


def longest(graph: nx.DiGraph, lengths: dict[str, float]) -> list[str]:
    """Reference: follow the longest remaining path from the best source (ties by name)."""
    def key(node: str) -> tuple[float, str]:
        return (-lengths[node], node)

    path = [min((node for node in graph if graph.in_degree(node) == 0), key=key)]
    while list(graph.successors(path[-1])):
        path.append(min(graph.successors(path[-1]), key=key))
    return path


@pytest.mark.parametrize("name", PROGRAMS)
def test_plan_shape_matches_networkx(name: str) -> None:
    # Given a program and its networkx graph
    data = PROGRAMS[name]
    graph = nx_graph(data)
    weights = {node: (index * 7 % 5) / 4 for index, node in enumerate(graph) if index % 3}
    # When it is planned (by count and by weights)
    plan = Program.from_dict(data).plan()
    weighted = Program.from_dict(data).plan(weights=weights)
    # Then levels, parents, children, priorities and critical paths are networkx's
    assert plan.levels == [sorted(level) for level in nx.topological_generations(graph)]
    for node in graph:
        module = plan.modules[node]
        assert module.parents == tuple(sorted(graph.predecessors(node)))
        assert module.children == tuple(sorted(graph.successors(node)))
        assert plan.levels[module.level].count(node) == 1
    assert {node: m.priority for node, m in plan.modules.items()} == remaining(graph)
    assert {node: m.priority for node, m in weighted.modules.items()} == remaining(graph, weights)
    assert plan.critical_path == longest(graph, remaining(graph))
    assert weighted.critical_path == longest(graph, remaining(graph, weights))
    assert plan.sinks == [node for node in graph if graph.out_degree(node) == 0]
    assert nx.is_directed_acyclic_graph(graph)


def test_dag_build_refuses_cycles_and_unknown_modules() -> None:
    assert Dag.build({"a": ["b"], "b": ["a"], "c": []}) is None
    assert Dag.build({"a": ["a"]}) is None
    assert Dag.build({"a": ["ghost"]}) is None
    dag = Dag.build({"c": ["a", "b"], "b": ["a"], "a": []})
    assert dag is not None and dag.levels == [["a"], ["b"], ["c"]]
    assert dag.children == {"a": ("b", "c"), "b": ("c",), "c": ()}


def problems_of(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ProgramError) as caught:
        Program.from_dict(data).plan()
    return caught.value.problems


class Ref(StrEnum):
    GHOST = "$ghost.x"


@pytest.mark.parametrize(
    ("inputs", "outputs", "expected"),
    [
        ({"x": ["$inputs.nope"]}, None, "module 'a' input 'x' refers to $inputs.nope, but the program has no input"),
        ({"x": {"deep": ["$ghost"]}}, None, "module 'a' input 'x' refers to unknown module 'ghost'"),
        ({"x": "$inputs"}, None, "module 'a' input 'x' refers to $inputs, but the program has no input 'None'"),
        ({"x": "$"}, None, "module 'a' input 'x' refers to unknown module ''"),
        ({"x": Ref.GHOST}, None, "module 'a' input 'x' refers to unknown module 'ghost'"),
        ({"x": "$inputs.q"}, {"o": ["$inputs.r"]}, "output 'o' refers to $inputs.r, but the program has no input 'r'"),
        ({"x": "$inputs.q"}, {"o": "$ghost.x"}, "output 'o' refers to unknown module 'ghost'"),
        ({"x": "$inputs.q", "depends_on": ["inputs"]}, None, "module 'a' depends_on unknown module 'inputs'"),
    ],
)
def test_every_reference_problem_is_worded(inputs: dict[str, Any], outputs: dict[str, Any] | None,
                                           expected: str) -> None:
    # Given a program whose one problem hides in a nested value, a str subclass, the outputs or depends_on
    inputs = dict(inputs)
    module = {"uses": ECHO, "depends_on": inputs.pop("depends_on", []), "inputs": inputs}
    data: dict[str, Any] = {"name": "p", "inputs": ["q"], "modules": {"a": module}}
    if outputs is not None:
        data["outputs"] = outputs
    # Then planning it names exactly that problem
    (problem,) = problems_of(data)
    assert problem.startswith(expected)


def test_literals_and_escapes_are_not_references() -> None:
    data = {"name": "p", "inputs": ["q"], "modules": {
        "a": {"uses": ECHO, "inputs": {"x": "$$ghost", "y": "plain $ghost", "z": ["$$", 3, None, 1.5, True]}},
        "b": {"uses": ECHO, "inputs": {"x": ["$a.x", {"y": "$inputs.q"}], "n": 2}},
    }}
    plan = Program.from_dict(data).plan()
    assert plan.levels == [["a"], ["b"]] and plan.modules["b"].parents == ("a",)


def test_from_dict_copies_its_data() -> None:
    # Given a program made from a mapping with lists and mappings in an input, a with key and an output
    data = {"name": "p", "modules": {"a": {"uses": ECHO, "inputs": {"x": [1, {"y": 2}]}, "with": {"w": [3]}}},
            "outputs": {"o": ["$a.x"]}}
    program = Program.from_dict(data)
    # When the caller changes the mapping afterwards, at every depth
    data["modules"]["a"]["inputs"]["x"][1]["y"] = 3
    data["modules"]["a"]["with"]["w"].append(4)
    data["outputs"]["o"].append("$b.x")
    data["modules"]["b"] = {"uses": ECHO}
    data["name"] = "q"
    # Then the program is the one it was given
    plan = program.plan()
    assert list(plan.modules) == ["a"] and plan.modules["a"].inputs == {"x": [1, {"y": 2}]}
    assert plan.modules["a"].with_ == {"w": [3]} and plan.outputs == {"o": ["$a.x"]} and program.name == "p"
    # And building on the program leaves the caller's mapping alone
    program.add_module("c", ADD, inputs={"a": 1, "b": 2})
    assert list(data["modules"]) == ["a", "b"] and list(program.plan().modules) == ["a", "c"]


def test_from_dict_of_invalid_data_copies_it_too() -> None:
    # Given a program made from a mapping with a problem
    data = {"name": "p", "modules": {"a": {"uses": ECHO, "inputs": {"x": "$ghost.y"}, "retry": {"max_attempts": 0}}}}
    program = Program.from_dict(data)
    # When the caller mends the mapping afterwards
    data["modules"]["a"]["retry"]["max_attempts"] = 2
    data["modules"]["a"]["inputs"]["x"] = 1
    # Then the program still has its problem, worded when it is validated
    with pytest.raises(ProgramError, match="max_attempts"):
        program.plan()


def test_planning_pauses_the_garbage_collector_and_restores_it() -> None:
    # Given a collector that would collect after every few allocations
    data = synthetic.dense_dag(200, seed=4)
    collections: list[int] = []

    def record(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            collections.append(info["generation"])

    threshold = gc.get_threshold()
    gc.set_threshold(10)
    gc.callbacks.append(record)
    try:
        # When a program is parsed, planned, and its plan read back from JSON
        counts = []
        program = Program.from_dict(data)
        counts.append(len(collections))
        plan = program.plan()
        counts.append(len(collections))
        text = plan.to_json()
        collections.clear()
        again = Plan.from_json(text)
        counts.append(len(collections))
        # Then none of them collected meanwhile (one may run as each starts, one as the collector resumes), and the
        # collector is on again afterwards
        assert counts[0] <= 2 and counts[1] - counts[0] <= 2 and counts[2] <= 2, counts
        assert gc.isenabled() and again.modules == plan.modules
        # And a collector the caller turned off stays off
        gc.disable()
        Program.from_dict(data).plan()
        assert not gc.isenabled()
    finally:
        gc.enable()
        gc.callbacks.remove(record)
        gc.set_threshold(*threshold)


@pytest.mark.parametrize("broker", ["memory://", "redis://localhost:6379/0", "amqp://guest@localhost//"])
def test_signatures_are_the_ones_celery_builds(broker: str) -> None:
    # Given a plan with a timeout and two resource classes, and an app on the broker
    app = Celery("planner-test", broker=broker, set_as_current=False)
    data = synthetic.layered(3, 2)
    data["modules"]["m1_0"].update(timeout_s=2.5, resource="io")
    plan = Program.from_dict(data).plan()
    # When its module and stage signatures are built
    module = module_signature(app, plan, "x" * 32, "m1_0", "ns")
    stage = stage_signature(app, plan, "x" * 32, "levels", 1, plan.levels[1], "ns")
    # Then they are what app.signature and chord() over a list of tasks build
    expected = app.signature(RUN_MODULE, args=("x" * 32, "m1_0"), kwargs={"program": plan.program}, immutable=True,
                             **module["options"])
    assert module == expected and json.dumps(module) == json.dumps(expected)
    assert module["options"]["time_limit"] == hard_time_limit(2.5) and module["options"]["queue"] == "ns.io"
    header = [module_signature(app, plan, "x" * 32, name, "ns") for name in plan.levels[1]]
    assert json.dumps(stage) == json.dumps(chord(header, stage.body, app=app))
    assert all(task.app is app for task in stage.tasks)


def test_module_plan_takes_every_module_key() -> None:
    # Given a module that sets every key the plan carries (the planner passes them by position)
    module = {"uses": ECHO, "inputs": {"x": 1}, "depends_on": ["a"], "resource": "io", "with": {"w": 2},
              "state": "/tmp/state.json", "timeout_s": 3.5, "retry": {"max_attempts": 7},
              "circuit_breaker": {"failures": 9}, "dspy": {"lm": "tests.modules.basic:echo"},
              "backup_after_s": 4.5, "compensate": "tests.modules.basic:echo"}
    data = {"name": "p", "modules": {"a": {"uses": ECHO}, "b": module}}
    # When it is planned (state files are not checked without resolving)
    plan = Program.from_dict(data).plan(resolve=False, weights={"a": 2.0, "b": 0.5})
    # Then each field holds its own key's value
    planned = plan.modules["b"]
    assert (planned.name, planned.uses, planned.inputs, planned.depends_on) == ("b", ECHO, {"x": 1}, ("a",))
    assert (planned.parents, planned.children, planned.resource) == (("a",), (), "io")
    assert (planned.level, planned.priority, planned.with_, planned.state) == (1, 0.5, {"w": 2}, "/tmp/state.json")
    assert (planned.timeout_s, planned.retry["max_attempts"], planned.circuit_breaker["failures"]) == (3.5, 7, 9)
    assert (planned.dspy, planned.timeout_source) == ({"lm": "tests.modules.basic:echo"}, None)
    assert (planned.backup_after_s, planned.compensate) == (4.5, "tests.modules.basic:echo")
    assert plan.modules["a"].children == ("b",) and plan.modules["a"].priority == 2.5
