"""Fixtures for real services: Redis, RabbitMQ, PostgreSQL and `dspex-celery worker` subprocesses.

A test that needs a service it cannot reach fails under CI=true and is skipped elsewhere.
Each cluster gets its own namespace (queue names and state keys), so tests cannot see each other.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa

from dspex_celery.bootstrap import create_runtime
from dspex_celery.client import ExecutionHandle, submit_program
from dspex_celery.history.store import HistoryStore
from dspex_celery.program import Program
from dspex_celery.results import ExecutionResult
from dspex_celery.runtime import Runtime
from dspex_celery.settings import Settings
from dspex_celery.testing import (  # noqa: F401  (the suite's test modules import these from here)
    CLI,
    ListenerProcess,
    RedisServer,
    WorkerProcess,
    free_port,
    fresh_namespace,
    program,
    subprocess_env,
    wait_for,
)
from dspex_celery.testing import Cluster as BaseCluster
from tests.modules import suite_redis_url

ROOT = Path(__file__).resolve().parent.parent
#: The suite's Redis (``DSPEX_TEST_REDIS_URL``); every subprocess the suite starts gets the variable too.
REDIS_URL = suite_redis_url()
AMQP_URL = os.environ.get("DSPEX_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
POSTGRES_URL = os.environ.get("DSPEX_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
IN_CI = os.environ.get("CI", "").lower() == "true"
TEST_MODULES = "tests.modules"
#: The caller's ``DSPEX_*`` variables a suite subprocess keeps: the suite's own, and its history database.
INHERITED = ("DSPEX_TEST_", "DSPEX_HISTORY_URL")


def unique(name: str) -> str:
    """A program name of its own: circuits are per program + module, so runs do not share one."""
    return f"{name}_{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="session", autouse=True)
def _history_in_a_temp_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Embedded runs record history; keep the tests' history out of the user's data directory."""
    if "DSPEX_HISTORY_URL" in os.environ:
        yield
        return
    path = tmp_path_factory.mktemp("history") / "history.sqlite"
    os.environ["DSPEX_HISTORY_URL"] = f"sqlite:///{path}"
    yield
    os.environ.pop("DSPEX_HISTORY_URL", None)


def unavailable(service: str, reason: str) -> None:
    """Fail under CI, skip on a developer machine without the service."""
    message = f"{service} is not reachable ({reason})"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def redis_url() -> str:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        unavailable("Redis", str(exc))
    return REDIS_URL


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis this test may shut down and restart (never the shared one)."""
    if shutil.which("redis-server") is None:
        unavailable("redis-server", "not installed")
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def amqp_url() -> str:
    import kombu

    try:
        with kombu.Connection(AMQP_URL, connect_timeout=3) as connection:
            connection.ensure_connection(max_retries=1)
    except Exception as exc:  # kombu raises transport-specific errors
        unavailable("RabbitMQ", str(exc))
    return AMQP_URL


@pytest.fixture(scope="session")
def postgres_admin() -> sa.Engine:
    """An engine on the test database (PostgreSQL)."""
    engine = sa.create_engine(POSTGRES_URL)
    try:
        with engine.connect():
            pass
    except sa.exc.OperationalError as exc:
        unavailable("PostgreSQL", str(exc.orig).splitlines()[0])
    return engine


@pytest.fixture
def postgres_url(postgres_admin: sa.Engine) -> Iterator[str]:
    """A fresh schema of the test database, dropped afterwards."""
    schema = f"h_{uuid.uuid4().hex[:12]}"
    with postgres_admin.begin() as connection:
        connection.execute(sa.text(f"CREATE SCHEMA {schema}"))
    yield postgres_schema_url(schema)
    with postgres_admin.begin() as connection:
        connection.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))


def postgres_schema_url(schema: str) -> str:
    """The test database with ``schema`` first on the search path (tables land there)."""
    return f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"


def cli_env(settings: Settings, **extra: str) -> dict[str, str]:
    """Environment for a `dspex-celery` subprocess of the suite using ``settings``.

    The caller's ``DSPEX_*`` settings are left out (``settings`` decides); the suite's own
    ``DSPEX_TEST_*`` variables and ``DSPEX_HISTORY_URL`` are passed on.
    """
    return subprocess_env(settings, inherit=INHERITED, pythonpath=(ROOT,), DSPEX_TEST_REDIS_URL=REDIS_URL, **extra)


@dataclass
class Cluster(BaseCluster):
    """A :class:`dspex_celery.testing.Cluster` of the suite: run from the repository root (``tests``
    importable), the suite's Redis and history variables passed on."""

    cwd: Path | None = ROOT
    pythonpath: tuple[str | Path, ...] = (ROOT,)
    inherit: tuple[str, ...] = INHERITED
    extra_env: dict[str, str] = field(default_factory=lambda: {"DSPEX_TEST_REDIS_URL": REDIS_URL})


def new_settings(broker_url: str, result_backend: str | None = None, **extra: Any) -> Settings:
    """Settings of a fresh namespace allowing the suite's modules and the examples."""
    return Settings(broker_url=broker_url, result_backend=result_backend, namespace=fresh_namespace(),
                    modules=TEST_MODULES + ",dspex_celery.examples", **extra)


@pytest.fixture(scope="module")
def make_cluster(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A factory of clusters (own namespace each) torn down at the end of the test module."""
    clusters: list[Cluster] = []

    def factory(broker_url: str | None = None, result_backend: str | None = None, **extra: Any) -> Cluster:
        settings = new_settings(broker_url or redis_url, result_backend, **extra)
        cluster = Cluster(settings, tmp_path_factory.mktemp("cluster"))
        clusters.append(cluster)
        return cluster

    yield factory
    for cluster in clusters:
        cluster.stop()


@pytest.fixture(scope="module", params=["embedded", pytest.param("redis", marks=pytest.mark.integration)])
def runtime(request: pytest.FixtureRequest) -> Runtime:
    """Where both modes must behave alike: an embedded runtime (in-process worker), then the client
    of a real `dspex-celery worker` on Redis (``default`` resource class)."""
    if request.param == "embedded":
        return create_runtime(Settings(namespace=fresh_namespace("embedded")))
    cluster = request.getfixturevalue("make_cluster")()
    cluster.start_worker("default", concurrency=4, pool="threads")
    return cluster.runtime


def dspex(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`dspex-celery ARGS` from the repository root, none of the caller's ``DSPEX_*`` settings but
    the history database."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("DSPEX_") or k == "DSPEX_HISTORY_URL"}
    base["PYTHONPATH"] = str(ROOT)
    return subprocess.run([CLI, *args], cwd=ROOT, capture_output=True, text=True, env={**base, **(env or {})}, timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, *fragments: str) -> None:
    """The command failed with ``code`` and only ``error: ...`` lines (no traceback) containing ``fragments``."""
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines and all(line.startswith("error: ") for line in lines), result.stderr
    for fragment in fragments:
        assert fragment in result.stderr


class HistoryCluster:
    """A cluster, its history database and its listener subprocesses."""

    def __init__(self, cluster: Cluster, url: str, redis_url: str) -> None:
        self.cluster = cluster
        self.url = url
        self.redis_url = redis_url
        self.history = HistoryStore(url)
        self.listeners: list[ListenerProcess] = []
        self.runtime = create_runtime(cluster.settings.model_copy(update={"history_url": url}))

    def submit(self, prog: Program, **options: Any) -> ExecutionHandle:
        """Submit from a client that reads profiles from this history."""
        return submit_program(prog, {}, app=self.runtime.app, **options)

    def start_listener(self) -> ListenerProcess:
        listener = self.cluster.start_listener(self.url)
        self.listeners.append(listener)
        return listener

    def recorded(self, execution_id: str, timeout: float = 30) -> ExecutionResult:
        """The execution's history once it is recorded as finished."""
        wait_for(lambda: self.history.final_ids([execution_id]), timeout,
                   lambda: f"execution {execution_id} not finished in history; listener logs:\n{self.logs()}")
        return self.history.result(execution_id)

    def attempts(self, execution_id: str) -> list[tuple[str, int, str]]:
        return [(row.module, row.attempt, row.status) for row in self.history.attempts([execution_id])]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.cluster.cli(*args, env={"DSPEX_HISTORY_URL": self.url})

    def logs(self) -> str:
        return "\n".join(listener.log.read_text(errors="replace")[-2000:] for listener in self.listeners)

    def stop(self) -> None:
        for listener in self.listeners:
            listener.stop()
