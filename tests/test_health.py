"""`dspex-celery ping`: the healthcheck of workers and the listener (docker-compose.yml uses it)."""

from __future__ import annotations

import socket

import pytest

from tests.conftest import Cluster, assert_one_line_error

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(make_cluster) -> Cluster:
    return make_cluster()


def test_ping_fails_in_one_line_until_a_worker_of_the_namespace_answers(cluster: Cluster) -> None:
    # Given no worker of this namespace yet (other test clusters' workers on the same broker do not count)
    missing = cluster.cli("ping", "--timeout", "0.5")
    assert_one_line_error(missing, 1, f"a worker on {socket.gethostname()}", f"{cluster.settings.namespace}.control")
    # When one starts, Then ping answers with its node name
    cluster.start_worker("default", concurrency=1, pool="threads")
    ok = cluster.cli("ping")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("pong from dspex-default-") and ok.stdout.strip().endswith(f"@{socket.gethostname()}")
    # And a named node that does not exist is not healthy
    assert_one_line_error(cluster.cli("ping", "--node", "nobody@nowhere", "--timeout", "0.5"), 1, "nobody@nowhere")


def test_ping_listener_checks_the_history_consumer(cluster: Cluster, tmp_path) -> None:
    assert_one_line_error(cluster.cli("ping", "--listener"), 1, f"listener listener@{socket.gethostname()}")
    cluster.start_listener(f"sqlite:///{tmp_path / 'history.db'}")
    ok = cluster.cli("ping", "--listener")
    assert ok.returncode == 0, ok.stderr
    assert f"reading {cluster.settings.namespace}:history" in ok.stdout
