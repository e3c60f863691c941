"""``StateStore.begin``: one script reads what a module needs and starts its first attempt."""

from __future__ import annotations

import uuid

from dspex_celery.results import ModuleRecord, ModuleStatus
from dspex_celery.state import LuaStep, StateStore

ECHO = "return {KEYS[k], ARGV[a], ARGV[a + 1]}"  # a step that shows which keys and args it got


def running() -> ModuleRecord:
    return ModuleRecord(status=ModuleStatus.RUNNING, attempts=1)


def test_first_attempt_is_started_and_every_step_gets_its_own_keys_and_args() -> None:
    store = StateStore.in_memory(f"begin-{uuid.uuid4().hex[:6]}", 60)
    store.put_output("e1", "parent", {"x": 1})
    steps = [LuaStep(ECHO, ["k1"], ["a1", "b1"]), LuaStep(ECHO, ["k2"], ["a2", "b2"])]
    start = store.begin("e1", "child", ["parent", "missing"], running(), steps)
    assert start.running_written and not start.finished
    assert start.upstream == {"parent": {"x": 1}}
    assert start.step_replies == [["k1", "a1", "b1"], ["k2", "a2", "b2"]]
    assert store.record("e1", "child").status is ModuleStatus.RUNNING


def test_a_module_with_a_record_is_not_restarted_and_steps_do_not_run() -> None:
    store = StateStore.in_memory(f"begin-{uuid.uuid4().hex[:6]}", 60)
    store.put_record("e1", "m", ModuleRecord(status=ModuleStatus.RETRYING, attempts=1))
    start = store.begin("e1", "m", [], running(), [LuaStep(ECHO, ["k"], ["a", "b"])])
    assert not start.running_written and start.step_replies == []
    assert start.record.status is ModuleStatus.RETRYING
    assert store.record("e1", "m").status is ModuleStatus.RETRYING
