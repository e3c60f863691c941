"""Flower on the project's app: every module run of an execution is found through its HTTP API."""

from __future__ import annotations

import base64
import json
import shutil
import socket
import struct
import subprocess
import time
import zlib
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from dspex_celery import ExecutionStatus
from dspex_celery.cli import cli
from tests.conftest import CLI, ROOT, Cluster, program

pytestmark = pytest.mark.integration

AUTH = "ops:s3cret"
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(url: str, auth: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with NO_PROXY.open(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except urllib.error.URLError:
        return 0, ""  # not listening (yet)


@pytest.fixture(scope="module")
def cluster(make_cluster) -> Cluster:
    cluster = make_cluster()
    cluster.start_worker("default", "io", concurrency=2, pool="threads")
    return cluster


@pytest.fixture(scope="module")
def flower(cluster: Cluster) -> Iterator[str]:
    """`dspex-celery flower` on a free loopback port with basic auth; yields its base URL."""
    port = free_port()
    log = cluster.tmp / "flower.log"
    with log.open("wb") as handle:
        process = subprocess.Popen(
            [CLI, "flower", "--port", str(port), "--address", "127.0.0.1", "--basic-auth", AUTH],
            cwd=ROOT, env=cluster.env(), stdout=handle, stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while get(f"{base}/healthcheck")[0] != 200:
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"flower did not answer:\n{log.read_text()}"
            time.sleep(0.2)
        wait_until_flower_sees_events(cluster, base)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=10)


def wait_until_flower_sees_events(cluster: Cluster, base: str, timeout: float = 30) -> None:
    """Its event receiver connects after the HTTP server: run a probe until Flower lists it."""
    probe = program("probe", {"one": {"uses": "tests.modules.basic:add", "inputs": {"a": 1, "b": 1}}})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        execution_id = cluster.submit(probe).execution_id
        for _ in range(10):
            status, body = get(f"{base}/api/tasks?search={execution_id}", AUTH)
            if status == 200 and json.loads(body):
                return
            time.sleep(0.2)
    raise AssertionError("flower saw no task events")


def test_every_module_run_is_in_flower(cluster: Cluster, flower: str, tmp_path) -> None:
    # Given a program whose `flaky` module fails once (transient) and is retried
    prog = program("watched", {
        "first": {"uses": "tests.modules.basic:add", "inputs": {"a": 1, "b": 2}},
        "flaky": {"uses": "tests.modules.ops_mods:flaky", "resource": "io",
                  "inputs": {"marker_dir": str(tmp_path), "key": "k"}, "retry": {"max_attempts": 2, "backoff_s": 0}},
        "last": {"uses": "tests.modules.basic:add", "inputs": {"a": "$first.sum", "b": "$flaky.calls"}},
    })
    handle = cluster.submit(prog)
    assert handle.get(timeout=60).status is ExecutionStatus.SUCCEEDED
    # Then Flower's API lists each module run: id EXEC.MODULE, name dspex.module:PROGRAM.MODULE
    tasks = wait_for_tasks(flower, handle.execution_id, {"first", "flaky", "last"})
    for module in ("first", "flaky", "last"):
        task = tasks[f"{handle.execution_id}.{module}"]
        assert task["name"] == f"dspex.module:watched.{module}"
        assert task["state"] == "SUCCESS"
        assert handle.execution_id in task["args"] and module in task["args"] and "watched" in task["kwargs"]
    # And the attempt shows: the retried module's second attempt has retries == 1
    assert tasks[f"{handle.execution_id}.flaky"]["retries"] == 1
    assert tasks[f"{handle.execution_id}.first"]["retries"] == 0


def test_search_by_execution_id_lists_every_task_of_a_levels_run(cluster: Cluster, flower: str) -> None:
    # Given a two-level program run by the levels strategy (a chord per level, an advance task after each)
    prog = program("leveled", {
        "first": {"uses": "tests.modules.basic:echo", "inputs": {"text": "x" * 500, "n": 7}},
        "second": {"uses": "tests.modules.basic:add", "inputs": {"a": "$first.n", "b": 1}},
    })
    handle = cluster.submit(prog, strategy="levels")
    assert handle.get(timeout=60).status is ExecutionStatus.SUCCEEDED
    execution = handle.execution_id
    # When Flower is searched by the execution id, Then it lists the module runs and the advances too
    wanted = {f"{execution}.first", f"{execution}.second", f"{execution}.advance.1", f"{execution}.advance.2"}
    tasks = wait_for_task_ids(flower, execution, wanted)
    advances = {tid: task["name"] for tid, task in tasks.items() if ".advance." in tid}
    assert set(advances.values()) == {"dspex.advance"}, advances
    # And every task of the execution carries its id (none has a random UUID)
    assert all(tid.startswith(f"{execution}.") for tid in tasks), sorted(tasks)
    # And a module's result shows a short summary of its output, bounded in size
    first = tasks[f"{execution}.first"]["result"]
    assert "'status': 'succeeded'" in first and "'output': {'n': 7, 'text': 'xxx" in first, first
    assert "x" * 100 not in first and len(first) < 400, first
    assert "'sum': 8" in tasks[f"{execution}.second"]["result"]


def wait_for_task_ids(base: str, execution_id: str, wanted: set[str], timeout: float = 30) -> dict[str, dict]:
    """Flower's tasks found by searching for ``execution_id``, once ``wanted`` have all succeeded."""
    deadline = time.monotonic() + timeout
    while True:
        status, body = get(f"{base}/api/tasks?search={execution_id}", AUTH)
        tasks = json.loads(body) if status == 200 else {}
        if {tid for tid in wanted if tasks.get(tid, {}).get("state") == "SUCCESS"} == wanted:
            return tasks
        assert time.monotonic() < deadline, f"flower has {sorted(tasks)} ({status}), wanted {sorted(wanted)}"
        time.sleep(0.3)


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,900", "--virtual-time-budget=3000"]


def screenshot(url: str, tmp: Path, name: str) -> bytes:
    """A PNG of ``url`` as headless Chromium (Debian's ``chromium``; scripts/test.sh installs it) shows it."""
    chromium = shutil.which("chromium")
    assert chromium, "chromium is not installed (scripts/test.sh installs it with apt-get)"
    png = tmp / f"{name}.png"
    shot = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp / 'chromium'}", f"--screenshot={png}",
                           url], capture_output=True, text=True, timeout=60, check=False)
    assert png.exists(), shot.stderr[-2000:]
    return png.read_bytes()


def scanlines(png: bytes) -> tuple[int, int, list[bytes]]:
    """Width, height and the (filtered) scanlines of an 8-bit RGB(A) PNG: a tiny decode with zlib."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    position, idat, header = 8, b"", (0, 0, 0, 0)
    while position < len(png):
        length, kind = struct.unpack(">I4s", png[position:position + 8])
        body = png[position + 8:position + 8 + length]
        position += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBB", body[:10])
        elif kind == b"IDAT":
            idat += body
    width, height, depth, color = header
    assert depth == 8 and color in (2, 6), header
    stride = 1 + width * (3 if color == 2 else 4)
    raw = zlib.decompress(idat)
    assert len(raw) == stride * height
    return width, height, [raw[row * stride:(row + 1) * stride] for row in range(height)]


def assert_not_blank(png: bytes, name: str) -> None:
    """A real page: the full window, and rows that differ (a blank page has one kind of row)."""
    width, height, rows = scanlines(png)
    assert (width, height) == (1280, 900), name
    distinct = len(set(rows))
    assert len(png) > 15_000 and distinct > 100, f"{name} looks blank: {len(png)} bytes, {distinct} distinct rows"


def test_screenshots_of_flower_and_the_report(cluster: Cluster, flower: str, tmp_path: Path) -> None:
    # Given a finished execution
    handle = cluster.submit(program("shown", {
        "first": {"uses": "tests.modules.basic:add", "inputs": {"a": 1, "b": 2}},
        "second": {"uses": "tests.modules.basic:add", "inputs": {"a": "$first.sum", "b": 3}},
    }))
    assert handle.get(timeout=60).status is ExecutionStatus.SUCCEEDED
    wait_for_tasks(flower, handle.execution_id, {"first", "second"})
    # Then Flower's task list (behind its credentials) renders in Chromium
    assert_not_blank(screenshot(flower.replace("http://", f"http://{AUTH}@") + "/tasks", tmp_path, "flower"), "flower")
    # And so does the execution's HTML report
    report = tmp_path / "report.html"
    written = CliRunner().invoke(cli, ["report", handle.execution_id, "-o", str(report)], env=cluster.env())
    assert written.exit_code == 0, written.output
    assert_not_blank(screenshot(report.as_uri(), tmp_path, "report"), "report")


def test_api_needs_credentials(flower: str) -> None:
    assert get(f"{flower}/api/tasks")[0] == 401
    assert get(f"{flower}/api/tasks", "ops:wrong")[0] == 401
    assert get(f"{flower}/api/tasks", AUTH)[0] == 200


def test_metrics_need_the_credentials_and_the_healthcheck_does_not(flower: str) -> None:
    assert get(f"{flower}/metrics")[0] == 401  # its labels name every task and worker
    assert get(f"{flower}/metrics", "ops:wrong")[0] == 401
    assert get(f"{flower}/healthcheck") == (200, "OK")


def test_prometheus_metrics_name_modules(cluster: Cluster, flower: str) -> None:
    cluster.run(program("metered", {"one": {"uses": "tests.modules.basic:add", "inputs": {"a": 1, "b": 1}}}))
    deadline = time.monotonic() + 20
    while 'task="dspex.module:metered.one"' not in (text := get(f"{flower}/metrics", AUTH)[1]):
        assert time.monotonic() < deadline, text[-2000:]
        time.sleep(0.3)
    assert "flower_events_total" in text


def wait_for_tasks(base: str, execution_id: str, modules: set[str], timeout: float = 30) -> dict[str, dict]:
    wanted = {f"{execution_id}.{module}" for module in modules}
    deadline = time.monotonic() + timeout
    while True:
        status, body = get(f"{base}/api/tasks?search={execution_id}", AUTH)
        tasks = json.loads(body) if status == 200 else {}
        done = {tid for tid, task in tasks.items() if tid in wanted and task.get("state") == "SUCCESS"}
        if done == wanted:
            return tasks
        assert time.monotonic() < deadline, f"flower has {sorted(tasks)} ({status}), wanted {sorted(wanted)}"
        time.sleep(0.3)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--address", "0.0.0.0"], ("error: refusing to serve Flower on 0.0.0.0 without authentication: "
                                    "pass --basic-auth USER:PASSWORD (or set DSPEX_FLOWER_BASIC_AUTH), "
                                    "or listen on 127.0.0.1")),
        (["--basic-auth", "nopassword"], "error: --basic-auth expects USER:PASSWORD (comma-separated for several users)"),
    ],
)
def test_flower_refuses_unsafe_options(cluster: Cluster, args: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, ["flower", *args], env=cluster.env())
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [message]
