"""Passwords in URLs never reach a terminal or a log: errors, the worker, the listener, Flower, report."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from sqlalchemy import make_url

from dspex_celery.settings import redact
from tests.conftest import CLI, POSTGRES_URL, ROOT, Cluster, RedisServer, free_port, unavailable, wait_for

pytestmark = pytest.mark.integration

PASSWORD = f"pw-{uuid.uuid4().hex[:12]}"


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://:secret@host:6379/3", "redis://:***@host:6379/3"),
    ("rediss://user:secret@host:6380/0?ssl_cert_reqs=none", "rediss://user:***@host:6380/0?ssl_cert_reqs=none"),
    ("amqp://guest:secret@host:5672//", "amqp://guest:***@host:5672//"),
    ("amqp://a:secret@h1//;amqp://b:secret@h2//", "amqp://a:***@h1//;amqp://b:***@h2//"),
    ("postgresql+psycopg://user:se@cret@host:5432/db", "postgresql+psycopg://user:***@host:5432/db"),
    ("redis://:secret@host:noport/0", "redis://:***@host:noport/0"),
    ("redis://:sec/ret@host/0", "redis://:***@host/0"),
    ("redis://host:6379/0", "redis://host:6379/0"),
    ("redis://user@host/0", "redis://user@host/0"),
    ("sqlite:////tmp/history.db", "sqlite:////tmp/history.db"),
    ("redis://host:6379/0?password=secret", "redis://host:6379/0?password=***"),
    ("redis://host/0?db=1&password=secret&ssl=true", "redis://host/0?db=1&password=***&ssl=true"),
    ("sentinel://h1:26379;sentinel://h2:26379?sentinel_password=secret",
     "sentinel://h1:26379;sentinel://h2:26379?sentinel_password=***"),
])
def test_redact_masks_only_the_password(url: str, shown: str) -> None:
    assert redact(url) == shown


@pytest.fixture(scope="module")
def secret_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A Redis of this module's own that wants PASSWORD."""
    server = RedisServer(tmp_path_factory.mktemp("redis"), password=PASSWORD).start()
    yield server
    server.stop()


def dspex(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("DSPEX_") or k == "DSPEX_HISTORY_URL"}
    return subprocess.run([CLI, *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**base, "PYTHONPATH": str(ROOT), **(env or {})})


def assert_masked_error(done: subprocess.CompletedProcess[str], *shown: str) -> None:
    """One ``error:`` line naming the masked URL(s); the password nowhere."""
    output = done.stdout + done.stderr
    assert PASSWORD not in output, output
    assert done.returncode != 0 and done.stderr.startswith("error: "), output
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    for fragment in shown:
        assert fragment in done.stderr, done.stderr


# Each: the command line, then what its error shows ({redis}: the password Redis's port, {dead}: a closed port).
ERROR_PATHS = [
    ("status --broker redis://:{pw}@127.0.0.1:{dead}/0",
     "cannot reach the result backend at redis://:***@127.0.0.1:{dead}/0"),
    ("status --broker redis://:{pw}@127.0.0.1:{redis}/0 --result-backend redis://:{pw}@127.0.0.1:{dead}/1",
     "cannot reach the result backend at redis://:***@127.0.0.1:{dead}/1"),
    ("status --broker redis://:wrong-{pw}@127.0.0.1:{redis}/0",
     "cannot reach the result backend at redis://:***@127.0.0.1:{redis}/0"),
    ("resources --broker amqp://guest:{pw}@127.0.0.1:{dead}// --result-backend redis://:{pw}@127.0.0.1:{redis}/0",
     "cannot reach the broker at amqp://guest:***@127.0.0.1:{dead}//"),
    ("status --broker amqp://guest:{pw}@127.0.0.1:{dead}//",
     "no Redis result backend for broker amqp://guest:***@127.0.0.1:{dead}//"),
    ("status --broker amqp://guest:{pw}@127.0.0.1:{dead}// --result-backend db+postgresql://u:{pw}@127.0.0.1/db",
     "result backend db+postgresql://u:***@127.0.0.1/db is not Redis"),
    ("report nope -o /dev/null --broker redis://:{pw}@127.0.0.1:{redis}/0",
     "unknown or expired execution 'nope' in the state store at redis://:***@127.0.0.1:{redis}/0"),
    ("run examples/rag.yaml -i question=x --broker redis://:{pw}@127.0.0.1:{dead}/0",
     "cannot reach the result backend at redis://:***@127.0.0.1:{dead}/0"),
    ("worker -m dspex_celery.examples --broker redis://:{pw}@127.0.0.1:{dead}/0",
     "cannot reach the result backend at redis://:***@127.0.0.1:{dead}/0"),
    ("listener --broker redis://:{pw}@127.0.0.1:{dead}/0",
     "cannot reach the result backend at redis://:***@127.0.0.1:{dead}/0"),
    ("flower --broker amqp://guest:{pw}@127.0.0.1:{dead}// --result-backend redis://:{pw}@127.0.0.1:{redis}/0",
     "cannot reach the broker at amqp://guest:***@127.0.0.1:{dead}//"),
    ("history --history-url postgresql+nosuchdriver://u:{pw}@127.0.0.1:{dead}/db",
     "invalid history database URL postgresql+nosuchdriver://u:***@127.0.0.1:{dead}/db"),
    ("history --history-url mysql+pymysql://u:{pw}@127.0.0.1:{dead}/db",  # pymysql: not a dependency
     "history database URL mysql+pymysql://u:***@127.0.0.1:{dead}/db needs a driver that is not installed"),
    ("history --history-url postgresql+psycopg://u:{pw}@127.0.0.1:noport/db",
     "invalid history database URL postgresql+psycopg://u:***@127.0.0.1:noport/db"),
    ("show abc --history-url postgresql+psycopg://u:{pw}@127.0.0.1:{dead}/db",
     "cannot open the history database postgresql+psycopg://u:***@127.0.0.1:{dead}/db"),
]


@pytest.mark.parametrize(("command", "shown"), ERROR_PATHS, ids=[case[0].split()[0] + str(n) for n, case in
                                                                  enumerate(ERROR_PATHS)])
def test_error_lines_mask_the_password(secret_redis: RedisServer, command: str, shown: str) -> None:
    ports = {"pw": PASSWORD, "redis": secret_redis.port, "dead": free_port()}
    done = dspex(*command.format(**ports).split(), env={"DSPEX_HISTORY_URL": "off"})
    assert_masked_error(done, shown.format(**ports))


def history_with_password() -> str:
    """The suite's PostgreSQL URL with a password (its own if it has one; trust auth ignores ours)."""
    url = make_url(POSTGRES_URL)
    return url.set(password=url.password or PASSWORD).render_as_string(hide_password=False)


def test_cluster_processes_never_show_the_password(make_cluster, secret_redis: RedisServer, tmp_path: Path) -> None:
    # Given a worker, a listener writing a PostgreSQL history and Flower, all on URLs with passwords
    history = history_with_password()
    if dspex("history", "--history-url", history).stderr.startswith("error: cannot open"):
        unavailable("PostgreSQL", history.replace(PASSWORD, "***"))
    cluster: Cluster = make_cluster(broker_url=secret_redis.url(0))
    worker = cluster.start_worker(concurrency=1, pool="solo")
    env = cluster.env(DSPEX_HISTORY_URL=history)
    logs = {"listener": tmp_path / "listener.log", "flower": tmp_path / "flower.log"}
    commands = {"listener": [CLI, "listener"], "flower": [CLI, "flower", "--port", str(free_port())]}
    processes = {name: subprocess.Popen(commands[name], cwd=ROOT, env=env, stdout=logs[name].open("wb"),
                                        stderr=subprocess.STDOUT) for name in logs}
    try:
        wait_for(lambda: "listener ready" in logs["listener"].read_text(), 30, "the listener")
        wait_for(lambda: "Broker:" in logs["flower"].read_text(), 30, "flower")
        # When a program runs there, and status and report look at it
        path = tmp_path / "p.yaml"
        path.write_text(yaml.safe_dump({"name": "secret", "modules": {
            "a": {"uses": "tests.modules.basic:add", "inputs": {"a": 1, "b": 2}}}}))
        ran = cluster.cli("run", str(path), "--json", env={"DSPEX_HISTORY_URL": history})
        assert ran.returncode == 0, ran.stderr
        execution_id = json.loads(ran.stdout)["execution_id"]
        shown = [ran, cluster.cli("status", env={"DSPEX_HISTORY_URL": history}),
                 cluster.cli("report", execution_id, "-o", str(tmp_path / "r.html"), env={"DSPEX_HISTORY_URL": history})]
        time.sleep(1)  # let the listener log what it does with the execution
    finally:
        for process in processes.values():
            process.terminate()
            process.wait(timeout=15)
        worker.stop()
    # Then no output and no log holds the password, and the listener names its database masked
    for done in shown:
        assert done.returncode == 0 and PASSWORD not in done.stdout + done.stderr, done.stderr
    assert PASSWORD not in (tmp_path / "r.html").read_text()
    for log in [worker.log, *logs.values()]:
        assert PASSWORD not in log.read_text(errors="replace"), log.read_text(errors="replace")[-2000:]
    assert ":***@" in logs["listener"].read_text()
