"""Cluster-wide resource limits: concurrency across workers, rate, lease expiry of a killed worker."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from datetime import timedelta

import pytest
from click.testing import CliRunner, Result

from dspex_celery import ExecutionStatus
from dspex_celery.cli import cli
from dspex_celery.errors import ConfigError
from dspex_celery.resources import parse_limits, snapshot
from dspex_celery.results import ModuleRecord, parse_time
from dspex_celery.routing import queue_name
from tests.conftest import Cluster, WorkerProcess, program

LIMITS = {
    "llm": {"max_concurrent": 2},
    "api": {"rate": "4/s"},
    "gpu": {"max_concurrent": 1, "lease_ttl_s": 1.5},
}
LIMITS_ENV = {"DSPEX_RESOURCES": json.dumps(LIMITS)}
HOLD = "tests.modules.ops_mods:hold"


def max_overlap(records: list[ModuleRecord]) -> int:
    """Most modules running at once, from recorded start/finish (a finish before a start at a tie)."""
    events = sorted(
        [(parse_time(r.started_at), 1) for r in records] + [(parse_time(r.finished_at), -1) for r in records]
    )
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def parallel(name: str, count: int, resource: str, seconds: float) -> object:
    modules = {f"m{i}": {"uses": HOLD, "inputs": {"seconds": seconds}, "resource": resource} for i in range(count)}
    return program(name, modules)


@pytest.fixture(scope="module")
def cluster(make_cluster) -> Cluster:
    """Two workers of concurrency 4 serving `llm` and `api`, and one prefork worker for `gpu`."""
    cluster = make_cluster(resources=LIMITS)
    for _ in range(2):
        cluster.start_worker("llm", "api", concurrency=4, pool="threads", env=LIMITS_ENV, wait=False)
    cluster.start_worker("gpu", concurrency=1, pool="prefork", env=LIMITS_ENV, wait=False)
    for worker in cluster.workers:  # started together, so they boot in parallel
        worker.wait_ready()
    return cluster


def invoke(cluster: Cluster, *args: str, **env: str) -> Result:
    """The CLI in this process (same command code, no interpreter start-up)."""
    return CliRunner().invoke(cli, list(args), env=cluster.env(**env))


def test_concurrency_limit_holds_across_workers(cluster: Cluster) -> None:
    # Given 8 parallel `llm` modules, 8 worker slots in two workers, and llm: {max_concurrent: 2}
    result = cluster.run(parallel("limited", 8, "llm", 0.3))
    assert result.status is ExecutionStatus.SUCCEEDED
    records = list(result.modules.values())
    # Then never more than 2 ran at once, and the limit was used (2 did run together)
    assert max_overlap(records) == 2
    # And both workers ran some (the limit is cluster-wide, not per worker)
    assert len({record.worker for record in records}) == 2
    # And the modules that waited say so: waited_s, with started_at after the wait
    waited = sorted(record.waited_s or 0.0 for record in records)
    assert waited[-1] >= 0.3 * 3 * 0.9  # the last pair waited for three pairs before it
    assert all(record.waiting_for is None and record.attempts == 1 for record in records)


def test_rate_limit_spaces_starts(cluster: Cluster) -> None:
    # Given api: {rate: "4/s"} and 8 quick modules
    result = cluster.run(parallel("rated", 8, "api", 0.05))
    assert result.status is ExecutionStatus.SUCCEEDED
    starts = sorted(parse_time(record.started_at) for record in result.modules.values())
    # Then no 1-second window holds more than 4 starts
    assert all(starts[i + 4] - starts[i] >= timedelta(seconds=0.98) for i in range(len(starts) - 4))


def test_killed_worker_slot_comes_back(cluster: Cluster) -> None:
    # Given a prefork worker holding the only `gpu` slot (lease TTL 1.5 s) with a long module
    holder, other = cluster.workers[2], cluster.workers[0]
    hog = cluster.submit(program("hog", {"hog": {"uses": HOLD, "inputs": {"seconds": 120}, "resource": "gpu"}}))
    gpu = wait_for_holder(cluster, "gpu")
    assert gpu["holders"][0]["execution_id"] == hog.execution_id and gpu["holders"][0]["module"] == "hog"
    shown = json.loads(invoke(cluster, "resources", "--json", **LIMITS_ENV).stdout)
    assert [row["in_use"] for row in shown["resources"] if row["resource"] == "gpu"] == [1]
    table = invoke(cluster, "resources", **LIMITS_ENV).stdout
    gpu_line = next(line for line in table.splitlines() if line.startswith("gpu"))
    holder_line = next(line for line in table.splitlines() if line.startswith(f"{hog.execution_id}.hog"))
    assert gpu_line.split()[:5] == ["gpu", "1", "-", "1", "100%"] and holder_line.split()[1] == "gpu"
    # When the whole worker (main process and pool) is killed
    for pid in [*holder.pool_pids(), holder.process.pid]:
        os.kill(pid, signal.SIGKILL)
    holder.process.wait(timeout=10)
    # Then another worker gets the slot once the lease expires, and the next gpu module runs
    queue = queue_name(cluster.settings.namespace, "gpu")
    replies = cluster.runtime.app.control.add_consumer(queue, destination=[worker_hostname(other)], reply=True)
    assert replies and "ok" in json.dumps(replies), replies
    result = cluster.run(program("after_kill", {"next": {"uses": HOLD, "inputs": {"seconds": 0.1}, "resource": "gpu"}}),
                         timeout=30)
    assert result.status is ExecutionStatus.SUCCEEDED
    assert [row["in_use"] for row in gpu_rows(cluster)] == [0]


def worker_hostname(worker: WorkerProcess) -> str:
    return f"{worker.name}@{socket.gethostname()}"


def gpu_rows(cluster: Cluster) -> list[dict]:
    return [row for row in snapshot(cluster.runtime.store, parse_limits(LIMITS)) if row["resource"] == "gpu"]


def wait_for_holder(cluster: Cluster, resource: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = gpu_rows(cluster)
        if rows and rows[0]["holders"]:
            return rows[0]
        time.sleep(0.1)
    raise AssertionError(f"no {resource} holder after {timeout}s")


# --- configuration --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"llm": {"max_concurrent": 0}}, "resources.llm.max_concurrent: Input should be greater than or equal to 1"),
        ({"llm": {"rate": "lots"}}, "resources.llm.rate: Value error, rate 'lots' is not COUNT/UNIT"),
        ({"llm": {"max": 2}}, "resources.llm.max: Extra inputs are not permitted"),
    ],
)
def test_invalid_limits_name_the_setting(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(")) as caught:
        parse_limits(raw)
    assert "DSPEX_RESOURCES" in str(caught.value) and "\n" not in str(caught.value)


def test_limits_parse_rates() -> None:
    limits = parse_limits({"llm": {"max_concurrent": 8, "rate": "60/m"}, "io": {}})
    assert limits["llm"].rate_window == (60, 60.0) and limits["io"].rate_window == (0, 0.0)


def test_cli_rejects_invalid_limits_in_one_line(cluster: Cluster) -> None:
    result = invoke(cluster, "resources", DSPEX_RESOURCES=json.dumps({"llm": {"rate": "1/week"}}))
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        ("error: resources.llm.rate: Value error, rate '1/week' is not COUNT/UNIT with UNIT s, m or h "
         "(e.g. \"60/m\"): fix `resources:` in the config file or DSPEX_RESOURCES")
    ]
