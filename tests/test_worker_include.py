"""``dspex-celery worker --include MODULE`` makes plain Celery tasks of MODULE run on a dspex worker."""

from __future__ import annotations

import pytest

from dspex_celery.routing import queue_name
from tests.conftest import Cluster
from tests.modules.failing_bootstep import MESSAGE
from tests.modules.raw_tasks import PID

pytestmark = pytest.mark.integration


def test_included_shared_task_runs_on_dspex_worker(make_cluster) -> None:
    # Given a dspex worker started with --include tests.modules.raw_tasks
    cluster: Cluster = make_cluster()
    worker = cluster.start_worker("default", concurrency=1, extra_args=("--include", "tests.modules.raw_tasks"))
    # When a plain Celery task of that module is sent, by name, to the worker's queue
    queue = queue_name(cluster.settings.namespace, "default")
    result = cluster.runtime.app.signature(PID, args=(7,), queue=queue).apply_async()
    # Then its result comes back, computed in one of that worker's pool processes
    output = result.get(timeout=30)
    assert output["value"] == 7
    assert output["pid"] in worker.pool_pids()


def test_worker_that_stops_on_an_unrecoverable_error_exits_non_zero(make_cluster) -> None:
    # Given a worker whose included module adds a bootstep that fails when the worker starts
    cluster: Cluster = make_cluster()
    worker = cluster.start_worker("default", concurrency=1, pool="threads", wait=False,
                                  extra_args=("--include", "tests.modules.failing_bootstep"))
    # When it starts, it hits Celery's unrecoverable-error path and stops
    code = worker.process.wait(timeout=60)
    # Then its exit code says so (a supervisor restarting on failure sees a failure), and the log names why
    assert code != 0, worker.log.read_text()
    log = worker.log.read_text()
    assert "Unrecoverable error" in log and MESSAGE in log
