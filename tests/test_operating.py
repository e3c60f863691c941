"""Operating a cluster: `dspex-celery ping`, the healthcheck of workers and the listener
(docker-compose.yml uses it), and a batch's progress line on a terminal."""

from __future__ import annotations

import json
import os
import pty
import re
import socket
import subprocess
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner, Result

from dspex_celery.cli import cli
from tests.conftest import CLI, ROOT, Cluster

pytestmark = pytest.mark.integration

HOST = socket.gethostname()
#: Terminal control sequences rich writes around the progress line.
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


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


def test_batch_progress_on_a_terminal_shows_eta_and_running_metric(cluster: Cluster, tmp_path: Path) -> None:
    if not cluster.workers:
        cluster.start_worker("default", concurrency=1, pool="threads")
    # Given a batch of 4 lines whose metric scores 1, 1, 0, 1
    program = tmp_path / "echo.yaml"
    program.write_text(yaml.safe_dump({"name": "echo", "inputs": ["question"], "modules": {
        "one": {"uses": "tests.modules.basic:echo", "inputs": {"text": "$inputs.question"}}},
        "outputs": {"answer": "$one.text"}}))
    inputs = tmp_path / "data.jsonl"
    inputs.write_text("".join(json.dumps({"question": f"q{index}", "expected": score}) + "\n"
                              for index, score in enumerate([1, 1, 0, 1])))
    env = cluster.env(COLUMNS="100")
    args = [CLI, "run", str(program), "--inputs-file", str(inputs), "--metric", "tests.modules.progress_mods:expected"]
    # When it runs with stderr on a terminal (a pty)
    leader, follower = pty.openpty()
    done = subprocess.run(args, check=False, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=follower, timeout=90)
    os.close(follower)
    shown = ANSI.sub("", os.read(leader, 65536).decode(errors="replace"))
    os.close(leader)
    # Then the progress line counts the lines, their rate, the ETA and the mean metric so far
    assert done.returncode == 0, shown
    final = re.findall(r"batch 4/4 · 0 failed · 0 in flight · [0-9.]+ lines/s · ETA [-:0-9]+ · metric ([0-9.]+)%", shown)
    assert final and final[-1] == "75.0", shown
    # And stdout is the same summary as without a terminal
    assert b"Average Metric: 3.00 / 4 (75.0%)" in done.stdout and b"batch 4/4" not in done.stdout


def test_a_second_worker_of_a_name_that_is_up_is_refused_and_a_restart_under_it_is_not(make_cluster) -> None:
    cluster = make_cluster()
    node = f"named-{os.getpid()}@{HOST}"
    first = cluster.start_worker("default", concurrency=1, pool="threads", extra_args=("-n", node))
    # When another worker is started under the name of one that is up, Then it is refused in one line
    second = cluster.cli("worker", "--pool", "threads", "-n", node, timeout=60)
    assert second.returncode == 2, second.stderr
    assert second.stderr.strip().splitlines() == [
        f"error: a worker named '{node}' is already up in namespace '{cluster.settings.namespace}': "
        "give this one another name (-n NAME), or stop that one first"]
    assert ping(cluster, "--node", node).stdout.strip() == f"pong from {node}"  # the first is untouched
    # When that worker is killed (its presence entry is still fresh), Then a restart under its name runs
    first.process.kill()
    first.process.wait(timeout=10)
    cluster.start_worker("default", concurrency=1, pool="threads", extra_args=("-n", node))
    assert ping(cluster, "--node", node).stdout.strip() == f"pong from {node}"
