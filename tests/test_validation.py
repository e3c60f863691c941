"""Validation of program files: every problem named on one line, all problems at once."""

from __future__ import annotations

import datetime as dt

import pytest

from dspex_celery import Program, ProgramError
from dspex_celery.spec import parse_ref

ADD = "tests.modules.basic:add"
ECHO = "tests.modules.basic:echo"


def problems_of(data: dict) -> list[str]:
    with pytest.raises(ProgramError) as caught:
        Program.from_dict(data).plan()
    return caught.value.problems


def test_cycle_is_named_in_order() -> None:
    # Given a three-module cycle
    data = {
        "name": "cyc",
        "modules": {
            "a": {"uses": ADD, "inputs": {"a": "$c.sum", "b": 1}},
            "b": {"uses": ADD, "inputs": {"a": "$a.sum", "b": 1}},
            "c": {"uses": ADD, "inputs": {"a": "$b.sum", "b": 1}},
        },
    }
    # Then the error spells the cycle out
    (problem,) = problems_of(data)
    assert problem.startswith("cycle: ")
    names = problem.removeprefix("cycle: ").split(" -> ")
    assert names[0] == names[-1] and sorted(names[:-1]) == ["a", "b", "c"]


def test_self_dependency_is_a_cycle() -> None:
    data = {"name": "s", "modules": {"a": {"uses": ADD, "depends_on": ["a"]}}}
    assert problems_of(data) == ["cycle: a -> a"]


def test_all_reference_problems_reported_at_once() -> None:
    data = {
        "name": "refs",
        "inputs": ["question"],
        "modules": {
            "a": {"uses": ADD, "inputs": {"a": "$inputs.qestion", "b": "$nowhere.x"}},
            "b": {"uses": ADD, "depends_on": ["ghost"]},
        },
        "outputs": {"answer": "$missing.value"},
    }
    problems = problems_of(data)
    assert len(problems) == 4
    assert any("$inputs.qestion" in p and "no input 'qestion'" in p and "question" in p for p in problems)
    assert any("unknown module 'nowhere'" in p for p in problems)
    assert any("depends_on unknown module 'ghost'" in p for p in problems)
    assert any(p.startswith("output 'answer'") and "unknown module 'missing'" in p for p in problems)


def test_unknown_keys_and_missing_keys() -> None:
    data = {"name": "k", "modules": {"a": {"usess": ADD}}, "extra": 1}
    problems = problems_of(data)
    assert "program: unknown key 'extra'" in problems
    assert "modules.a: unknown key 'usess'" in problems
    assert "modules.a.uses: required key is missing" in problems


def test_invalid_and_reserved_names() -> None:
    data = {"name": "n", "inputs": ["q", "q"], "modules": {"1bad": {"uses": ADD}, "inputs": {"uses": ADD}}}
    problems = problems_of(data)
    assert any("invalid module name '1bad'" in p for p in problems)
    assert any("invalid module name 'inputs'" in p and "reserved" in p for p in problems)
    assert "duplicate program input 'q'" in problems


def test_unresolvable_uses() -> None:
    data = {
        "name": "u",
        "modules": {
            "a": {"uses": "no_such_package.mod:fn"},
            "b": {"uses": "tests.modules.basic:no_such_fn"},
        },
    }
    problems = problems_of(data)
    assert any("module 'a': uses 'no_such_package.mod:fn' cannot be resolved" in p for p in problems)
    assert any("module 'b'" in p and "no attribute 'no_such_fn'" in p for p in problems)


def test_malformed_uses() -> None:
    (problem,) = problems_of({"name": "u", "modules": {"c": {"uses": "not a uses string"}}})
    assert problem.startswith("modules.c.uses: invalid value") and "package.module:attribute" in problem



@pytest.mark.parametrize("policy", ["retry", "circuit_breaker"])
def test_an_error_class_without_its_module_is_named_with_the_expected_form(policy: str) -> None:
    key = "on" if policy == "retry" else "ignore"
    module = {"uses": "tests.modules.basic:add", policy: {key: ["ValueError"]}}
    (problem,) = problems_of({"name": "u", "modules": {"c": module}})
    assert problem == f"modules.c.{policy}.{key}.0: invalid value 'ValueError' (expected 'package.module:attribute')"

def test_references_parse() -> None:
    assert str(parse_ref("$inputs.q")) == "$inputs.q"
    ref = parse_ref("$retrieve.passages")
    assert ref is not None and (ref.source, ref.field) == ("retrieve", "passages")
    ref = parse_ref("$retrieve")
    assert ref is not None and ref.field is None
    assert parse_ref("$$literal") is None and parse_ref("plain") is None


def test_plan_levels_and_critical_path() -> None:
    # Given a diamond with a longer right branch
    data = {
        "name": "d",
        "modules": {
            "top": {"uses": ADD, "inputs": {"a": 1, "b": 1}},
            "left": {"uses": ADD, "inputs": {"a": "$top.sum", "b": 1}},
            "right": {"uses": ADD, "inputs": {"a": "$top.sum", "b": 1}},
            "right2": {"uses": ADD, "inputs": {"a": "$right.sum", "b": 1}},
            "bottom": {"uses": ADD, "inputs": {"a": "$left.sum", "b": "$right2.sum"}},
        },
    }
    plan = Program.from_dict(data).plan()
    assert plan.levels == [["top"], ["left", "right"], ["right2"], ["bottom"]]
    assert plan.critical_path == ["top", "right", "right2", "bottom"]
    assert plan.width == 2
    assert plan.outputs == {"bottom": "$bottom"}
    assert plan.modules["bottom"].parents == ("left", "right2")


def test_fingerprint_changes_with_content() -> None:
    base = {"name": "f", "modules": {"a": {"uses": ADD, "inputs": {"a": 1, "b": 2}}}}
    changed = {"name": "f", "modules": {"a": {"uses": ADD, "inputs": {"a": 1, "b": 3}}}}
    first, again = Program.from_dict(base).plan(), Program.from_dict(base).plan()
    assert first.fingerprint == again.fingerprint
    assert first.fingerprint != Program.from_dict(changed).plan().fingerprint


def test_fingerprint_ignores_key_order_and_explicit_nulls() -> None:
    # A reformatted program file keeps its learned profile (profiles are stored by fingerprint)
    program = {"name": "f", "inputs": ["x"], "modules": {
        "a": {"uses": ADD, "inputs": {"a": "$inputs.x", "b": 2}},
        "b": {"uses": ADD, "inputs": {"a": "$a.sum", "b": {"n": 1, "m": [1, 2]}}}}}
    reordered = {"modules": {
        "b": {"inputs": {"b": {"m": [1, 2], "n": 1}, "a": "$a.sum"}, "uses": ADD, "resource": None},
        "a": {"inputs": {"b": 2, "a": "$inputs.x"}, "uses": ADD}}, "inputs": ["x"], "name": "f"}
    assert Program.from_dict(program).plan().fingerprint == Program.from_dict(reordered).plan().fingerprint
    # but a list's order is content
    swapped = {**program, "modules": {**program["modules"], "b": {
        "uses": ADD, "inputs": {"a": "$a.sum", "b": {"n": 1, "m": [2, 1]}}}}}
    assert Program.from_dict(swapped).plan().fingerprint != Program.from_dict(program).plan().fingerprint


def test_builder_equals_file_form() -> None:
    built = (
        Program("b", inputs=["x"])
        .add_module("one", ADD, inputs={"a": "$inputs.x", "b": 1})
        .add_module("two", ADD, inputs={"a": "$one.sum", "b": 1}, resource="io")
    )
    plan = built.plan()
    assert plan.levels == [["one"], ["two"]] and plan.modules["two"].resource == "io"


def test_literals_must_be_json_values() -> None:
    class Opaque:
        def __str__(self) -> str:
            return "opaque"

    program = {"name": "j", "modules": {
        "a": {"uses": ADD, "inputs": {"a": 1, "b": [1, {"when": dt.date(2024, 1, 2)}]}},
        "b": {"uses": ECHO, "inputs": {"a": "$a.sum", "b": 1}, "with": {"table": {1: "one"}}},
    }, "outputs": {"total": "$b.sum", "extra": Opaque()}}
    with pytest.raises(ProgramError) as caught:
        Program.from_dict(program).plan()
    assert caught.value.problems == [
        "module 'a' input 'b'[1].when: 2024-01-02 (date) is not a JSON value; values travel to workers as "
        "JSON: quote it in the program file, or pass a string, number, boolean, list or mapping",
        "module 'b' with 'table': key 1 (int) is not a string; mapping keys must be strings (quote it)",
        "output 'extra': opaque (Opaque) is not a JSON value; values travel to workers as JSON: quote it in "
        "the program file, or pass a string, number, boolean, list or mapping",
    ]
    # tuples are lists to JSON
    fine = {"name": "t", "modules": {"a": {"uses": ECHO, "inputs": {"a": 1, "b": 2}, "with": {"pair": (1, 2)}}}}
    assert Program.from_dict(fine).plan().modules["a"].with_ == {"pair": (1, 2)}


def test_inputs_a_plain_function_cannot_take_are_named_before_anything_runs() -> None:
    program = {"name": "k", "modules": {
        "short": {"uses": ADD, "inputs": {"a": 1}},
        "typo": {"uses": ADD, "inputs": {"a": 1, "bb": 2}},
        "fixed": {"uses": ADD, "inputs": {"a": 1}, "with": {"b": 2}},  # with: fills the rest
        "open": {"uses": ECHO, "inputs": {"anything": 1}},  # **kwargs takes any input
        "merged": {"uses": ADD, "depends_on": ["fixed"]},  # no inputs: upstream outputs are merged in
    }}
    with pytest.raises(ProgramError) as caught:
        Program.from_dict(program).plan()
    assert caught.value.problems == [
        "module 'short': tests.modules.basic:add needs input 'b' (add(a, b)): add it under inputs",
        "module 'typo': tests.modules.basic:add needs input 'b' (add(a, b)): add it under inputs",
        "module 'typo': tests.modules.basic:add takes no input 'bb' (add(a, b)): remove it or rename it",
    ]
