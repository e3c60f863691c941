"""Every key an execution leaves in Redis expires: no key of the namespace, or named after an
execution, without a TTL once runs of each strategy (and a cancelled and a failed one) are over."""

from __future__ import annotations

import uuid

import pytest

from dspex_celery import ExecutionStatus
from tests.conftest import Cluster, program, wait_for
from tests.modules.faulty import side_channel

pytestmark = pytest.mark.integration

BASIC = "tests.modules.basic"
FAULTY = "tests.modules.faulty"


@pytest.fixture(scope="module")
def cluster(make_cluster) -> Cluster:
    cluster = make_cluster()
    cluster.start_worker("default", concurrency=2)
    return cluster


def diamond(name: str) -> object:
    """a -> (b, c) -> d."""
    return program(name, {
        "a": {"uses": f"{BASIC}:add", "inputs": {"a": 1, "b": 2}},
        "b": {"uses": f"{BASIC}:inc", "inputs": {"x": "$a.sum"}},
        "c": {"uses": f"{BASIC}:inc", "inputs": {"x": "$a.sum"}},
        "d": {"uses": f"{BASIC}:total", "inputs": {"b": "$b.x", "c": "$c.x"}},
    })


def failing(name: str) -> object:
    """a fails (strict): b is cancelled, c (independent) may have run."""
    return program(name, {
        "a": {"uses": f"{BASIC}:fail", "retry": {"max_attempts": 1}},
        "b": {"uses": f"{BASIC}:inc", "inputs": {"x": 1}, "depends_on": ["a"]},
        "c": {"uses": f"{BASIC}:inc", "inputs": {"x": 1}},
    })


#: Keys of the deployment, shared by its executions: the history stream (capped in length). The
#: circuits of program modules are not among them: a failure counted there expires too.
DEPLOYMENT_KEYS = ("history",)


def keys_without_ttl(cluster: Cluster, execution_ids: list[str]) -> dict[str, str]:
    """Keys of the cluster's namespace, or with an execution id in their name, that never expire
    (key -> type), the deployment's own keys left out."""
    client = cluster.runtime.store.client
    namespace = cluster.settings.namespace
    patterns = [f"{namespace}:*", *(f"*{execution_id}*" for execution_id in execution_ids)]
    keys = {key for pattern in patterns for key in client.scan_iter(match=pattern, count=5000)}
    shared = tuple(f"{namespace}:{part}" for part in DEPLOYMENT_KEYS)
    return {key: client.type(key) for key in sorted(keys) if not key.startswith(shared) and client.ttl(key) == -1}


@pytest.mark.parametrize("strategy", ["sequential", "levels", "dag"])
def test_no_execution_key_outlives_the_state_ttl(cluster: Cluster, strategy: str) -> None:
    # Given a succeeded, a failed and a cancelled execution of the strategy
    succeeded = cluster.run(diamond(f"ttl_ok_{strategy}"), strategy=strategy)
    assert succeeded.status is ExecutionStatus.SUCCEEDED
    failed = cluster.submit(failing(f"ttl_fail_{strategy}"), strategy=strategy).get(timeout=90, propagate=False)
    assert failed.status is ExecutionStatus.FAILED
    breaker = f"{cluster.settings.namespace}:breaker:ttl_fail_{strategy}.a"
    assert cluster.runtime.store.client.hget(breaker, "failures") == "1"  # the failure was counted
    key = f"{cluster.settings.namespace}:side:{uuid.uuid4().hex[:8]}"
    handle = cluster.submit(program(f"ttl_cancel_{strategy}", {
        "long": {"uses": f"{FAULTY}:sleeper", "inputs": {"key": key, "seconds": 30}},
        "after": {"uses": f"{BASIC}:inc", "inputs": {"x": 1}, "depends_on": ["long"]},
    }), strategy=strategy)
    wait_for(lambda: side_channel().hget(key, "pid"), what="the long module to start")
    assert handle.cancel().status is ExecutionStatus.CANCELLED
    side_channel().delete(key)
    # When they are over, Then none of their keys is left without a TTL
    ids = [succeeded.execution_id, failed.execution_id, handle.execution_id]
    assert keys_without_ttl(cluster, ids) == {}
