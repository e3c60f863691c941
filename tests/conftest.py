"""Fixtures for real services: Redis, RabbitMQ, PostgreSQL and `dspex-celery worker` subprocesses.

A test that needs a service it cannot reach fails under CI=true and is skipped elsewhere.
Each cluster gets its own namespace (queue names and state keys), so tests cannot see each other.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from dspex_celery import ExecutionResult, Program, submit_program
from dspex_celery.bootstrap import create_runtime
from dspex_celery.runtime import Runtime
from dspex_celery.settings import Settings
from tests.modules import suite_redis_url

ROOT = Path(__file__).resolve().parent.parent
#: The suite's Redis (``DSPEX_TEST_REDIS_URL``); every subprocess the suite starts gets the variable too.
REDIS_URL = suite_redis_url()
AMQP_URL = os.environ.get("DSPEX_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
POSTGRES_URL = os.environ.get("DSPEX_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
IN_CI = os.environ.get("CI", "").lower() == "true"
CLI = str(Path(sys.executable).with_name("dspex-celery"))
TEST_MODULES = "tests.modules"


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


def wait_for(predicate: Any, timeout: float = 20.0, what: Any = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy (returned); fail after ``timeout`` s.

    ``what`` names the awaited thing in the failure (a string, or a callable giving one).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")


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


def free_port() -> int:
    """A loopback TCP port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RedisServer:
    """A `redis-server` of the test's own on a free loopback port (no persistence), to restart at will."""

    tmp: Path
    password: str | None = None
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url(), socket_connect_timeout=2)

    def start(self) -> RedisServer:
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.tmp)]
        if self.password:
            args += ["--requirepass", self.password]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self._answers, timeout=10, what=f"redis-server on port {self.port}")
        return self

    def _answers(self) -> bool:
        try:
            return bool(self.client().ping())
        except redis.RedisError:
            return False

    def shutdown_nosave(self) -> None:
        """``SHUTDOWN NOSAVE``: every key is gone; clients see the connection drop."""
        try:
            self.client().shutdown(nosave=True)
        except redis.ConnectionError:
            pass  # the server closed the connection as it went
        if self.process is not None:
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


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


def cli_env(settings: Settings, **extra: str) -> dict[str, str]:
    """Environment for a `dspex-celery` subprocess using ``settings``.

    The caller's ``DSPEX_*`` settings are left out (``settings`` decides); the suite's own
    ``DSPEX_TEST_*`` variables and ``DSPEX_HISTORY_URL`` are passed on.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSPEX_") or _passed_on(k)}
    env.update(
        {
            "DSPEX_TEST_REDIS_URL": REDIS_URL,
            "DSPEX_NAMESPACE": settings.namespace,
            "DSPEX_MODULES": settings.modules,
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
        }
    )
    if settings.broker_url:
        env["DSPEX_BROKER_URL"] = settings.broker_url
    if settings.result_backend:
        env["DSPEX_RESULT_BACKEND"] = settings.result_backend
    env.update(extra)
    return env


def _passed_on(variable: str) -> bool:
    return variable.startswith("DSPEX_TEST_") or variable == "DSPEX_HISTORY_URL"


@dataclass
class WorkerProcess:
    """A `dspex-celery worker` subprocess and its log file."""

    process: subprocess.Popen[bytes]
    log: Path
    resources: tuple[str, ...]

    def wait_ready(self, timeout: float = 45) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log.read_text(errors="replace") if self.log.exists() else ""
            if " ready." in text:
                return
            if self.process.poll() is not None:
                raise AssertionError(f"worker exited with {self.process.returncode}:\n{text[-3000:]}")
            time.sleep(0.1)
        raise AssertionError(f"worker not ready after {timeout}s:\n{self.log.read_text(errors='replace')[-3000:]}")

    @property
    def name(self) -> str:
        return f"dspex-{'+'.join(self.resources)}-{self.process.pid}"

    def pool_pids(self) -> list[int]:
        """Child (pool) process ids of this worker."""
        out = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True)
        return [int(pid) for pid in out.stdout.split()]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


@dataclass
class Cluster:
    """Workers in their own namespace, and a client runtime that talks to them."""

    settings: Settings
    tmp: Path
    workers: list[WorkerProcess] = field(default_factory=list)
    _runtime: Runtime | None = None

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            self._runtime = create_runtime(self.settings)
        return self._runtime

    def env(self, **extra: str) -> dict[str, str]:
        return cli_env(self.settings, **extra)

    def start_worker(
        self,
        *resources: str,
        concurrency: int = 2,
        pool: str = "prefork",
        extra_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        wait: bool = True,
    ) -> WorkerProcess:
        resources = resources or ("default",)
        log = self.tmp / f"worker-{len(self.workers)}-{'+'.join(resources)}.log"
        args = [CLI, "worker", "--concurrency", str(concurrency), "--pool", pool, "--loglevel", "INFO"]
        for resource in resources:
            args += ["--resource", resource]
        handle = log.open("wb")
        process = subprocess.Popen(
            [*args, *extra_args], cwd=ROOT, env=self.env(**(env or {})), stdout=handle, stderr=subprocess.STDOUT
        )
        worker = WorkerProcess(process, log, tuple(resources))
        self.workers.append(worker)
        if wait:
            worker.wait_ready()
        return worker

    def submit(self, program: Any, inputs: dict[str, Any] | None = None, **options: Any):  # noqa: ANN201
        return submit_program(program, inputs or {}, app=self.runtime.app, **options)

    def run(self, program: Any, inputs: dict[str, Any] | None = None, timeout: float = 90, **options: Any) -> ExecutionResult:
        return self.submit(program, inputs, **options).get(timeout=timeout, propagate=False)

    def cli(self, *args: str, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [CLI, *args], cwd=ROOT, env=self.env(**(env or {})), capture_output=True, text=True, timeout=timeout
        )

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()
        if self._runtime is not None:
            purge_namespace(self._runtime)


def purge_namespace(runtime: Runtime) -> None:
    """Delete every key of this namespace (state store and queues)."""
    client = runtime.store.client
    for pattern in (f"{runtime.settings.namespace}:*", f"{runtime.settings.namespace}.*"):
        keys = list(client.scan_iter(match=pattern, count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])


def new_settings(broker_url: str, result_backend: str | None = None, **extra: Any) -> Settings:
    return Settings(
        broker_url=broker_url,
        result_backend=result_backend,
        namespace=f"t{uuid.uuid4().hex[:10]}",
        modules=TEST_MODULES + ",dspex_celery.examples",
        **extra,
    )


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


def program(name: str, modules: dict[str, Any], inputs: list[str] | None = None, **keys: Any) -> Program:
    """A Program from a mapping, as a test writes it."""
    return Program.from_dict({"name": name, "inputs": inputs or [], "modules": modules, **keys})
