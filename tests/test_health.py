"""`dspex-celery ping`: the healthcheck of workers and the listener (docker-compose.yml uses it)."""

from __future__ import annotations

import socket

import pytest
from click.testing import CliRunner, Result

from dspex_celery.cli import cli
from tests.conftest import Cluster

pytestmark = pytest.mark.integration

HOST = socket.gethostname()


@pytest.fixture(scope="module")
def cluster(make_cluster) -> Cluster:
    return make_cluster()


def ping(cluster: Cluster, *args: str) -> Result:
    return CliRunner().invoke(cli, ["ping", *args], env=cluster.env())


def assert_unhealthy(result: Result, *fragments: str) -> None:
    """Exit status 1 and one ``error:`` line that contains ``fragments``."""
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert all(fragment in lines[0] for fragment in fragments), lines[0]


def test_ping_fails_in_one_line_until_a_worker_of_the_namespace_answers(cluster: Cluster) -> None:
    # Given no worker of this namespace yet (other clusters' workers on the same broker do not count)
    assert_unhealthy(ping(cluster, "--timeout", "0.5"), f"a worker on {HOST}", f"{cluster.settings.namespace}.control")
    # When one starts, Then ping answers with its node name
    cluster.start_worker("default", concurrency=1, pool="threads")
    ok = ping(cluster)
    assert ok.exit_code == 0, ok.output
    assert ok.stdout.startswith("pong from dspex-default-") and ok.stdout.strip().endswith(f"@{HOST}")


def test_ping_listener_checks_the_history_consumer(cluster: Cluster, tmp_path) -> None:
    assert_unhealthy(ping(cluster, "--listener"), f"listener listener@{HOST}", f"{cluster.settings.namespace}:history")
    cluster.start_listener(f"sqlite:///{tmp_path / 'history.db'}")
    ok = ping(cluster, "--listener")
    assert ok.exit_code == 0, ok.output
    assert f"reading {cluster.settings.namespace}:history" in ok.stdout
