"""Straggler backups on real workers: a module that stalls on its first attempt completes through its
backup on another worker, the stalled attempt is revoked (prefork) or its late result discarded
(threads), both are recorded; ``backup: false`` gets none."""

from __future__ import annotations

import json
import os
import time
import uuid

import pytest

from dspex_celery import ExecutionStatus
from dspex_celery.backups import LOST_TO_BACKUP, launched
from dspex_celery.optimizer import learned_backup
from tests.conftest import Cluster, program, wait_for
from tests.modules.rate_limit_mods import client

STALL = "tests.modules.backup_mods:stall_first"


@pytest.fixture(scope="module")
def cluster(make_cluster) -> Cluster:
    """Two prefork workers of one slot for `slow`, two thread-pool workers of one slot for `slowt`."""
    cluster = make_cluster()
    for resource, pool in (("slow", "prefork"), ("slow", "prefork"), ("slowt", "threads"), ("slowt", "threads")):
        cluster.start_worker(resource, concurrency=1, pool=pool, wait=False)
    for worker in cluster.workers:
        worker.wait_ready()
    return cluster


def stalling(name: str, resource: str, key: str, stall_s: float, **module: object) -> object:
    inputs = {"key": key, "stall_s": stall_s}
    return program(name, {"m": {"uses": STALL, "inputs": inputs, "resource": resource, "backup_after_s": 0.5,
                                **module}})


def calls(key: str, suffix: str) -> list:
    return [json.loads(item) for item in client().lrange(f"{key}:{suffix}", 0, -1)]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_stalled_module_completes_through_its_backup_and_is_revoked(cluster: Cluster) -> None:
    # Given a module whose first call stalls for 30 s, backup_after_s 0.5, on two one-slot prefork workers
    key = f"stall-{uuid.uuid4().hex}"
    started = time.monotonic()
    result = cluster.run(stalling("backed_up", "slow", key, 30), timeout=30)
    # Then it completes through the backup (the second call), long before the stall would end
    assert result.status is ExecutionStatus.SUCCEEDED and result.outputs["m"] == {"call": 2}
    assert time.monotonic() - started < 15
    record = result.modules["m"]
    assert record.model_extra["backup"] is True and record.attempts == 1
    # And the stalled attempt ran on the other worker, is recorded as lost to its backup, and was
    # terminated (its pool process is gone and the call never returned)
    store = cluster.runtime.store
    race = launched(store, result.execution_id, "m")
    assert race is not None and race["worker"] != record.worker
    attempts = wait_for(lambda: [a for a in store.attempts(result.execution_id) if a["status"] == "cancelled"],
                        what="the stalled attempt's entry")
    assert [(a["error"], a["worker"]) for a in attempts] == [(LOST_TO_BACKUP, race["worker"])]
    stalled_pid = calls(key, "calls")[0]["pid"]
    wait_for(lambda: not pid_alive(stalled_pid), timeout=15, what="the stalled pool process to be terminated")
    assert calls(key, "returned") == [2]


def test_threads_pool_discards_the_late_result(cluster: Cluster) -> None:
    # Given the same module stalling 2 s on thread-pool workers (a thread cannot be terminated), under dag
    key = f"stallt-{uuid.uuid4().hex}"
    result = cluster.run(stalling("backed_up_t", "slowt", key, 2), timeout=30, strategy="dag")
    assert result.status is ExecutionStatus.SUCCEEDED and result.outputs["m"] == {"call": 2}
    # When the stalled call returns after all
    wait_for(lambda: 1 in calls(key, "returned"), timeout=15, what="the stalled call to return")
    time.sleep(0.3)
    # Then its result was discarded: the output and record stay the backup's, the loser is logged once
    store = cluster.runtime.store
    assert store.outputs(result.execution_id, ["m"]) == {"m": {"call": 2}}
    assert store.record(result.execution_id, "m").model_extra["backup"] is True
    lost = [a for a in store.attempts(result.execution_id) if a["status"] == "cancelled"]
    assert [a["error"] for a in lost] == [LOST_TO_BACKUP]


def test_backup_false_gets_no_backup(cluster: Cluster) -> None:
    # Given a module with side effects (backup: false) that runs past its backup_after_s
    key = f"nobackup-{uuid.uuid4().hex}"
    result = cluster.run(stalling("no_backup", "slowt", key, 1.5, backup=False), timeout=30)
    # Then only its own attempt ran
    assert result.status is ExecutionStatus.SUCCEEDED and result.outputs["m"] == {"call": 1}
    assert len(calls(key, "calls")) == 1
    assert launched(cluster.runtime.store, result.execution_id, "m") is None


def test_learned_backup_thresholds_fill_in_where_the_program_sets_none() -> None:
    # Given a profile's learned thresholds (p95 x 2, at least 1 s) for three modules
    hold = "tests.modules.ops_mods:hold"
    modules = {"a": {"uses": hold}, "b": {"uses": hold, "backup_after_s": 5}, "c": {"uses": hold, "backup": False}}
    plan = program("learned_backups", modules).plan(learned_backups={"a": 2.0, "b": 9.0, "c": 3.0})
    # Then the program's own backup_after_s wins, backup: false has none, the rest take the learned one
    assert [plan.modules[name].backup_after_s for name in "abc"] == [2.0, 5, None]
    assert (learned_backup(0.1), learned_backup(3.01)) == (1.0, 6.1)


FAILS = "tests.modules.backup_mods:slow_then_fail"


def active_tasks(cluster: Cluster, execution_id: str) -> list[str]:
    """Ids of the execution's tasks some worker is running."""
    active = cluster.runtime.app.control.inspect(timeout=2).active() or {}
    return [task["id"] for tasks in active.values() for task in tasks if task["id"].startswith(execution_id)]


def failing(name: str, key: str, fail_calls: list[int]) -> object:
    inputs = {"key": key, "seconds": 1.5, "fail_calls": fail_calls}
    return program(name, {"m": {"uses": FAILS, "inputs": inputs, "resource": "slowt", "backup_after_s": 0.5,
                                "retry": {"max_attempts": 1}}})


def test_a_primary_that_fails_for_good_leaves_the_module_to_its_backup(cluster: Cluster) -> None:
    # Given a module whose first call fails for good after 1.5 s while its backup (sent at 0.5 s) succeeds
    # (under dag: a levels stage's chord waits for the primary's task, so there the primary decides)
    result = cluster.run(failing("fails_first", f"ff-{uuid.uuid4().hex}", [1]), timeout=30, strategy="dag")
    # Then the backup decides: the module succeeded, the primary's failure is in the attempt log
    assert result.status is ExecutionStatus.SUCCEEDED and result.outputs["m"] == {"call": 2}
    # (once the winner's hooks are done too: they run after its result is out)
    wait_for(lambda: not active_tasks(cluster, result.execution_id), timeout=10, what="no task of it to be active")
    logged = cluster.runtime.store.attempts(result.execution_id)
    assert [(a["status"], a.get("backup", False)) for a in logged] == [("failed", False), ("succeeded", True)]


def test_both_attempts_failing_fails_the_module(cluster: Cluster) -> None:
    # Given both the primary and its backup fail for good
    result = cluster.run(failing("both_fail", f"bf-{uuid.uuid4().hex}", [1, 2]), timeout=30, strategy="dag")
    # Then the second failure fails the module (nothing waits forever)
    assert result.status is ExecutionStatus.FAILED and result.modules["m"].status.value == "failed"
    assert len(cluster.runtime.store.attempts(result.execution_id)) == 2
