"""The strategies' decisions, as pure functions of a plan and its records (no Redis, no workers)."""

from __future__ import annotations

import pytest

from dspex_celery import ModuleRecord, ModuleStatus, Program, UsageError
from dspex_celery.plan import Plan, build_plan
from dspex_celery.strategies.dag import Count, parse_count, roots
from dspex_celery.strategies.levels import StagedStrategy, triage
from dspex_celery.strategies.registry import STRATEGIES, choose_strategy, get_strategy
from tests.modules.basic import DIAMOND


@pytest.fixture(scope="module")
def diamond() -> Plan:
    return build_plan(Program.from_dict(DIAMOND).spec)


def record(status: ModuleStatus) -> ModuleRecord:
    return ModuleRecord(status=status)


def test_every_strategy_is_found_by_its_name_and_no_other(diamond: Plan) -> None:
    assert STRATEGIES == ("levels", "sequential", "dag")
    assert [get_strategy(name).name for name in STRATEGIES] == list(STRATEGIES)
    with pytest.raises(UsageError, match="unknown strategy 'fastest': choose one of levels, sequential, dag"):
        choose_strategy(diamond, "fastest")


def test_levels_and_sequential_say_what_their_stages_are(diamond: Plan) -> None:
    levels, sequential = get_strategy("levels"), get_strategy("sequential")
    assert isinstance(levels, StagedStrategy) and isinstance(sequential, StagedStrategy)
    assert levels.stages(diamond) == [["top"], ["left", "right"], ["bottom"]]
    assert sequential.stages(diamond) == [["top"], ["left"], ["right"], ["bottom"]]


def test_a_stage_skips_what_a_failed_parent_blocks_and_leaves_reused_modules(diamond: Plan) -> None:
    assert triage(diamond, ["left", "right"], {"top": record(ModuleStatus.FAILED)}) == (
        [], [("left", "top", "failed"), ("right", "top", "failed")])
    reused = {"top": record(ModuleStatus.SUCCEEDED), "left": record(ModuleStatus.SUCCEEDED)}
    assert triage(diamond, ["left", "right"], reused) == (["right"], [])


def test_a_dag_starts_with_the_modules_whose_parents_are_all_done(diamond: Plan) -> None:
    assert roots(diamond, {}) == ["top"]
    assert roots(diamond, {"top": record(ModuleStatus.SUCCEEDED)}) == ["left", "right"]
    assert roots(diamond, {"top": record(ModuleStatus.SUCCEEDED), "left": record(ModuleStatus.SUCCEEDED)}) == ["right"]


def test_a_count_reply_gives_the_ready_children_and_what_blocks() -> None:
    reply = [0, 3, 2, "", "left", "right", "top", "failed"]
    assert parse_count(reply) == Count(False, 3, ["left", "right"], {"top": "failed"})
    assert parse_count([1, 0, 0, ""]) == Count(True, 0, [], {})
    assert parse_count([0, 4, 0, "left"]) == Count(False, 4, [], {}, continued="left")
    # a sink's count that closed the last open module: the finish claim's reply comes last
    assert parse_count([0, 0, 0, "", [1, 0]]) == Count(False, 0, [], {}, claimed=[1, 0])
    # a count that leased a child and began it too: the begin's reply comes with the lease
    begin = [None, ["strategy", '"dag"'], 0, 1, [None]]
    assert parse_count([0, 2, 1, ["e.left", begin], "gone"]) == Count(False, 2, ["gone"], {}, "e.left", begun=begin)
    # a count that took another execution's module whose message names its plan's digest
    assert parse_count([0, 1, 0, ["f.m", None, "ab12"]]) == Count(False, 1, [], {}, "f.m", plan="ab12")
    assert parse_count([0, 0, 0, ["f.m", None, "ab12"], [1, 0]]) == Count(False, 0, [], {}, "f.m", [1, 0], plan="ab12")
