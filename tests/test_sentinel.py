"""A Sentinel-managed state store (1 master, 1 replica, 1 sentinel, started by the test): its master
is killed mid-run and the execution still ends, within a bound; Sentinel and cluster URLs in settings."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner

from dspex_celery import ExecutionStatus, Program
from dspex_celery.app import celery_config
from dspex_celery.cli import cli
from dspex_celery.errors import ConfigError
from dspex_celery.examples import synthetic
from dspex_celery.redis_clients import SYNC_DEGRADED_S, SYNC_TIMEOUT_MS, ReplicaSync, connect, parse_cluster_url, parse_sentinel_url
from dspex_celery.results import ModuleStatus
from dspex_celery.settings import Settings, redact
from dspex_celery.testing import RedisServer, SentinelServers, wait_for
from tests.conftest import Cluster, unavailable

#: Seconds from the master's death to the execution's end that the test allows (Sentinel notices in
#: 1 s here, promotes the replica, and the module whose write failed is sent again within seconds).
FAILOVER_BOUND_S = 30


@pytest.fixture(scope="module")
def sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelServers]:
    if shutil.which("redis-server") is None:
        unavailable("redis-server", "not installed")
    servers = SentinelServers(tmp_path_factory.mktemp("sentinel")).start()
    yield servers
    servers.stop()


@pytest.fixture(scope="module")
def cluster(sentinel: SentinelServers, make_cluster: Any) -> Cluster:
    """A worker on the suite's Redis broker; the state store is the master Sentinel names."""
    cluster = make_cluster(result_backend=sentinel.url(), sentinel_master=sentinel.master_name)
    cluster.start_worker("default", concurrency=4, pool="threads")
    return cluster


@pytest.mark.integration
@pytest.mark.parametrize("strategy", ["dag", "levels"])
def test_master_killed_mid_run_the_execution_completes_on_the_promoted_replica(
        cluster: Cluster, sentinel: SentinelServers, strategy: str) -> None:
    # Given a 20-module chain running on a Sentinel-managed state store (levels: a chord per stage)
    first_master = sentinel.master_port_now()
    handle = cluster.submit(Program.from_dict(synthetic.chain(20, ms=150)), strategy=strategy, timeout=120)
    done_before = wait_for(lambda: [name for name, record in handle.records().items()
                                    if record.status is ModuleStatus.SUCCEEDED] if len(handle.records()) >= 6 else None,
                           timeout=30, what="six modules of the chain")
    # When its master is killed mid-run
    sentinel.kill_master()
    killed_at = time.monotonic()
    result = handle.get(timeout=FAILOVER_BOUND_S, propagate=False)
    # Then the execution ends within the bound, on the promoted replica, with the right output
    assert time.monotonic() - killed_at < FAILOVER_BOUND_S
    assert sentinel.master_port_now() == sentinel.replica_port != first_master
    assert result.status is ExecutionStatus.SUCCEEDED, result.error
    assert result.outputs == {"value": 20}
    # And the modules that had finished before the failover kept their outputs (none ran twice)
    assert all(result.modules[name].status is ModuleStatus.SUCCEEDED for name in done_before)
    assert sum(record.attempts for record in result.modules.values()) <= 20 + 2  # at most the interrupted one again
    sentinel.restore_replica()  # the dead master comes back as a replica: the next test can fail over again
    # The worker stops waiting for a replica for SYNC_DEGRADED_S each time the promoted master has none to
    # answer: the next test's writes must be waited for again, or its failover may lose them (seen in a busy suite)
    time.sleep(SYNC_DEGRADED_S + 1)


def test_sentinel_url_without_a_master_name_is_one_line() -> None:
    args = ["status", "--broker", "redis://127.0.0.1:1/0", "--result-backend", "sentinel://:pw@127.0.0.1:2/0"]
    result = CliRunner().invoke(cli, args, env={"DSPEX_SENTINEL_MASTER": None})
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output
    assert "sentinel://:***@127.0.0.1:2/0" in lines[0] and "DSPEX_SENTINEL_MASTER" in lines[0]


def test_sentinel_broker_and_backend_get_the_master_name() -> None:
    settings = Settings(broker_url="sentinel://127.0.0.1:26379/0;sentinel://127.0.0.1:26380/0", sentinel_master="prod")
    assert settings.state_url == settings.broker_url
    config = celery_config(settings)
    assert config["broker_transport_options"]["master_name"] == "prod"
    assert config["result_backend_transport_options"]["master_name"] == "prod"
    with pytest.raises(ConfigError, match="DSPEX_SENTINEL_MASTER"):
        celery_config(Settings(broker_url="redis://127.0.0.1:6379/0", result_backend="sentinel://127.0.0.1:26379"))


def test_cluster_and_sentinel_urls_are_parsed_and_redacted() -> None:
    cluster = parse_cluster_url("redis-cluster://app:s%40cret@10.0.0.1:7000,10.0.0.2:7001")
    assert cluster.nodes == (("10.0.0.1", 7000), ("10.0.0.2", 7001))
    assert (cluster.username, cluster.password) == ("app", "s@cret")
    sentinels = parse_sentinel_url("sentinel://:pw@h1:26379/2;sentinel://:pw@h2:26380/2")
    assert sentinels.nodes == (("h1", 26379), ("h2", 26380)) and sentinels.db == 2 and sentinels.password == "pw"
    assert redact("redis-cluster://app:secret@h1:7000,h2:7001") == "redis-cluster://app:***@h1:7000,h2:7001"
    assert redact("sentinel://:pw@h1:26379/0;sentinel://:pw@h2:26380/0") == "sentinel://:***@h1:26379/0;sentinel://:***@h2:26380/0"
    with pytest.raises(ConfigError, match="'h1' is not host:port"):
        connect("redis-cluster://:secret@h1,h2:7001")


def test_replica_sync_without_a_replica_waits_once_then_not_for_a_while(own_redis: RedisServer) -> None:
    # Given a master without replica (a Sentinel set-up whose replica is down)
    client = own_redis.client()
    sync = ReplicaSync(client, "t:replicated")
    # When a task waits for a replica: it waits the timeout once and then stops waiting
    started = time.monotonic()
    sync.wait()
    first = time.monotonic() - started
    started = time.monotonic()
    sync.wait()
    second = time.monotonic() - started
    assert SYNC_TIMEOUT_MS / 1000 * 0.9 <= first < SYNC_TIMEOUT_MS / 1000 + 1
    assert second < 0.05
    assert client.info("commandstats")["cmdstat_wait"]["calls"] == 1
