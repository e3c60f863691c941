"""``StateStore.begin``: one script reads what a module needs and starts its first attempt."""

from __future__ import annotations

import uuid

from dspex_celery.plan import plan_text
from dspex_celery.program import Program
from dspex_celery.results import ModuleRecord, ModuleStatus
from dspex_celery.state import LuaStep, StateStore

ECHO = "return {KEYS[k], ARGV[a], ARGV[a + 1]}"  # a step that shows which keys and args it got


def running() -> ModuleRecord:
    return ModuleRecord(status=ModuleStatus.RUNNING, attempts=1)


def test_first_attempt_is_started_and_every_step_gets_its_own_keys_and_args() -> None:
    store = StateStore.in_memory(f"begin-{uuid.uuid4().hex[:6]}", 60)
    store.update_meta("e1", strategy="dag")
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


def test_a_module_of_an_execution_whose_state_is_gone_is_not_started() -> None:
    # Given no execution e1 in the store (its state expired, say): only a worker's cached plan knew it
    namespace = f"begin-{uuid.uuid4().hex[:6]}"
    store = StateStore.in_memory(namespace, 60)
    # When a module of it begins
    start = store.begin("e1", "m", [], running())
    # Then the begin says so (no meta) and writes nothing
    assert start.meta == {} and not start.running_written
    assert store.client.keys(f"{namespace}:*") == []


def test_a_module_finishing_after_its_execution_state_is_gone_writes_nothing() -> None:
    # Given no execution e1 in the store: Redis restarted without persistence while a module of it ran
    namespace = f"save-{uuid.uuid4().hex[:6]}"
    store = StateStore.in_memory(namespace, 60)
    done = ModuleRecord(status=ModuleStatus.SUCCEEDED, attempts=1)
    # When the module succeeds, with a step that would count its children (as dag's count does)
    step = LuaStep("redis.call('HINCRBY', KEYS[k], 'child', -1) return {0}", [f"{namespace}:deps"], [])
    reply = store.save_success("e1", "m", {"x": 1}, done, then=step)
    # Then nothing is written, the step does not run (no counter left without a TTL), and the caller
    # is told, as when the execution had ended
    assert reply is None
    assert store.client.keys(f"{namespace}:*") == []


def test_a_module_of_a_live_execution_is_saved_and_its_step_runs() -> None:
    namespace = f"save-{uuid.uuid4().hex[:6]}"
    store = StateStore.in_memory(namespace, 60)
    store.update_meta("e1", strategy="dag")
    done = ModuleRecord(status=ModuleStatus.SUCCEEDED, attempts=1)
    step = LuaStep("return {7, KEYS[k], ARGV[a]}", ["k1"], ["a1"])
    assert store.save_success("e1", "m", {"x": 1}, done, then=step) == [7, "k1", "a1"]
    assert store.outputs("e1", ["m"]) == {"m": {"x": 1}}
    assert store.record("e1", "m").status is ModuleStatus.SUCCEEDED


def test_a_plan_parsed_once_is_found_by_its_digest_for_another_execution() -> None:
    # Given two executions of one plan, and a worker's store that read the first one's plan
    namespace = f"digest-{uuid.uuid4().hex[:6]}"
    client = StateStore.in_memory(namespace, 60)
    plan = Program.from_dict({"name": f"p{uuid.uuid4().hex[:6]}", "modules": {"m": {"uses": "tests.modules.basic:add"}}}).plan()
    for execution_id in ("e1", "e2"):
        client.create(execution_id, plan, {"strategy": "dag"})
    worker = StateStore(client.client, namespace, 60)
    first = worker.plan("e1")
    reads: list[str] = []
    get = worker.client.get
    worker.client = type("Watched", (), {"get": lambda self, key: reads.append(key) or get(key)})()
    # When it needs the second one's plan, knowing its text's digest (its task message names it)
    found = worker.plan("e2", plan_text(plan)[1])
    # Then it is the plan it parsed, and it read nothing; an unknown digest is read as before
    assert found is first and reads == []
    assert worker.plan("e3", "0" * 20) is None and reads == [worker.key("e3", "plan")]


def test_the_record_a_count_offers_for_a_taken_module_is_the_one_a_begin_would_write() -> None:
    # Given a worker's task and a plan whose module runs on a class of its own
    from types import SimpleNamespace

    from dspex_celery.results import parse_time
    from dspex_celery.tasks import fresh_record_json, running_record

    plan = Program.from_dict({"name": "p", "modules": {"m": {"uses": "tests.modules.basic:add", "resource": "llm"}}}).plan()
    task = SimpleNamespace(request=SimpleNamespace(hostname='dspex@host "1"'))
    # When the count offers a first attempt's running record from its template
    record = running_record(task, plan, "m", ModuleRecord())  # type: ignore[arg-type]
    assert record.started_at is not None
    offered = fresh_record_json('dspex@host "1"', "llm", record.started_at)
    # Then it is, byte for byte, the record a begin of the module's first attempt stores
    assert offered == record.model_dump_json()
    assert ModuleRecord.model_validate_json(offered).status is ModuleStatus.RUNNING
    assert parse_time(ModuleRecord.model_validate_json(offered).started_at or "") == parse_time(record.started_at)
