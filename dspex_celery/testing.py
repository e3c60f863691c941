"""Test harness for real clusters, like ``celery.contrib.testing``: `dspex-celery worker` subprocesses
in a namespace of their own, a client runtime that talks to them, and a `redis-server` to restart.

It imports no test runner (pytest fixtures are built on it in the project's ``tests/conftest.py``)::

    settings = Settings(broker_url="redis://127.0.0.1:6379/3", namespace=fresh_namespace(),
                        modules="myproject.modules")
    cluster = Cluster(settings, Path(tempfile.mkdtemp()))
    try:
        cluster.start_worker("default")          # returns once the worker logs " ready."
        result = cluster.run(program, {"x": 1})  # an ExecutionResult
    finally:
        cluster.stop()                           # workers stopped, the namespace's keys deleted
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import redis

from dspex_celery.bootstrap import create_runtime
from dspex_celery.client import ExecutionHandle, submit_program
from dspex_celery.program import Program
from dspex_celery.redis_clients import connect
from dspex_celery.results import ExecutionResult
from dspex_celery.runtime import Runtime
from dspex_celery.settings import Settings

#: The `dspex-celery` command of this Python environment.
CLI = str(Path(sys.executable).with_name("dspex-celery"))
#: What a Celery worker logs once it consumes, and a `dspex-celery listener` once it reads.
WORKER_READY = " ready."
LISTENER_READY = "listener ready"

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float = 20.0, what: str | Callable[[], str] = "condition") -> T:
    """Poll ``predicate`` until it returns something truthy (returned); AssertionError after ``timeout`` s.

    ``what`` names the awaited thing in the failure (a string, or a callable giving one).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")


def free_port() -> int:
    """A loopback TCP port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_cluster_port() -> int:
    """A free loopback port whose cluster bus port (the port + 10000) is free too."""
    while True:
        port = free_port()
        if port + 10000 <= 65535 and _port_free(port + 10000):
            return port


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def fresh_namespace(prefix: str = "t") -> str:
    """A namespace no other cluster uses (queue names and state keys start with it)."""
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def purge_namespace(client: redis.Redis, namespace: str) -> None:
    """Delete every key of ``namespace`` (state store keys and queues)."""
    for pattern in (f"{namespace}:*", f"{namespace}.*", namespace):
        keys = list(client.scan_iter(match=pattern, count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])


def program(name: str, modules: dict[str, Any], inputs: list[str] | None = None, **keys: Any) -> Program:
    """A Program from a mapping, as a test writes it."""
    return Program.from_dict({"name": name, "inputs": inputs or [], "modules": modules, **keys})


def subprocess_env(settings: Settings, *, inherit: Sequence[str] = (), pythonpath: Sequence[str | Path] = (),
                   **extra: str) -> dict[str, str]:
    """Environment of a `dspex-celery` subprocess using ``settings``.

    The caller's ``DSPEX_*`` variables are left out (``settings`` decides) except those starting with
    one of ``inherit``; ``pythonpath`` replaces ``PYTHONPATH``; ``extra`` comes last.
    """
    kept = tuple(inherit)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSPEX_") or (kept and k.startswith(kept))}
    env.update({"DSPEX_NAMESPACE": settings.namespace, "DSPEX_MODULES": settings.modules, "PYTHONUNBUFFERED": "1"})
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(str(path) for path in pythonpath)
    if settings.broker_url:
        env["DSPEX_BROKER_URL"] = settings.broker_url
    if settings.result_backend:
        env["DSPEX_RESULT_BACKEND"] = settings.result_backend
    if settings.sentinel_master:
        env["DSPEX_SENTINEL_MASTER"] = settings.sentinel_master
    env.update(extra)
    return env


def _log_text(log: Path) -> str:
    return log.read_text(errors="replace") if log.exists() else ""


def _log_tail(log: Path, chars: int = 3000) -> str:
    return _log_text(log)[-chars:]


@dataclass
class WorkerProcess:
    """A `dspex-celery worker` subprocess and its log file."""

    process: subprocess.Popen[bytes]
    log: Path
    resources: tuple[str, ...]
    #: Started in a session of its own: a hung worker's whole process group is killed.
    own_group: bool = False

    def wait_ready(self, timeout: float = 45) -> None:
        """Return once the worker logged " ready."; AssertionError if it exits or takes longer."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if WORKER_READY in _log_text(self.log):
                return
            if self.process.poll() is not None:
                raise AssertionError(f"worker exited with {self.process.returncode}:\n{_log_tail(self.log)}")
            time.sleep(0.1)
        raise AssertionError(f"worker not ready after {timeout}s:\n{_log_tail(self.log)}")

    @property
    def name(self) -> str:
        """The node name the worker gives itself (``dspex-<resources>-<pid>``)."""
        return f"dspex-{'+'.join(self.resources)}-{self.process.pid}"

    def pool_pids(self) -> list[int]:
        """Child (pool) process ids of this worker."""
        out = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True)
        return [int(pid) for pid in out.stdout.split()]

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM (warm shutdown), then SIGKILL if it is still running after ``timeout`` s."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            if self.own_group:
                os.killpg(self.process.pid, signal.SIGKILL)
            else:
                self.process.kill()
            self.process.wait(timeout=10)


@dataclass
class ListenerProcess:
    """A `dspex-celery listener` subprocess (it writes a cluster's history) and its log file."""

    process: subprocess.Popen[bytes]
    log: Path

    def wait_ready(self, timeout: float = 30) -> None:
        """Return once the listener logged that it is ready; AssertionError if it exits or takes longer."""
        def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"listener exited with {self.process.returncode}:\n{_log_tail(self.log)}")
            return LISTENER_READY in _log_text(self.log)

        wait_for(ready, timeout, lambda: f"listener not ready:\n{_log_tail(self.log)}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=15)


@dataclass
class Cluster:
    """Workers in the namespace of ``settings``, and a client runtime that talks to them.

    ``tmp`` holds the subprocesses' logs; they run in ``cwd`` with ``pythonpath`` as ``PYTHONPATH``,
    inherit the ``DSPEX_*`` variables starting with one of ``inherit``, and get ``extra_env``.
    ``new_session``: workers start in a session of their own (a terminal's Ctrl-C does not reach them).
    """

    settings: Settings
    tmp: Path
    cwd: Path | None = None
    pythonpath: tuple[str | Path, ...] = ()
    inherit: tuple[str, ...] = ()
    extra_env: dict[str, str] = field(default_factory=dict)
    new_session: bool = False
    workers: list[WorkerProcess] = field(default_factory=list)
    listeners: list[ListenerProcess] = field(default_factory=list)
    _runtime: Runtime | None = None

    @property
    def runtime(self) -> Runtime:
        """The client runtime (created on first use)."""
        if self._runtime is None:
            self._runtime = create_runtime(self.settings)
        return self._runtime

    def env(self, **extra: str) -> dict[str, str]:
        """Environment of a subprocess of this cluster."""
        return subprocess_env(self.settings, inherit=self.inherit, pythonpath=self.pythonpath,
                              **{**self.extra_env, **extra})

    def start_worker(
        self,
        *resources: str,
        concurrency: int = 2,
        pool: str = "prefork",
        extra_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        wait: bool = True,
    ) -> WorkerProcess:
        """Start a `dspex-celery worker` serving ``resources`` (default: ``default``); by default
        return once it is ready."""
        resources = resources or ("default",)
        log = self.tmp / f"worker-{len(self.workers)}-{'+'.join(resources)}.log"
        args = [CLI, "worker", "--concurrency", str(concurrency), "--pool", pool, "--loglevel", "INFO"]
        args += [arg for resource in resources for arg in ("--resource", resource)]
        with log.open("wb") as handle:
            process = subprocess.Popen([*args, *extra_args], cwd=self.cwd, env=self.env(**(env or {})),
                                       stdout=handle, stderr=subprocess.STDOUT, start_new_session=self.new_session)
        worker = WorkerProcess(process, log, tuple(resources), own_group=self.new_session)
        self.workers.append(worker)
        if wait:
            worker.wait_ready()
        return worker

    def start_listener(self, history_url: str, wait: bool = True) -> ListenerProcess:
        """Start a `dspex-celery listener` writing this cluster's history into ``history_url``."""
        log = self.tmp / f"listener-{len(self.listeners)}.log"
        with log.open("wb") as handle:
            process = subprocess.Popen([CLI, "listener"], cwd=self.cwd, env=self.env(DSPEX_HISTORY_URL=history_url),
                                       stdout=handle, stderr=subprocess.STDOUT)
        listener = ListenerProcess(process, log)
        self.listeners.append(listener)
        if wait:
            listener.wait_ready()
        return listener

    def submit(self, program: Program | str, inputs: dict[str, Any] | None = None, **options: Any) -> ExecutionHandle:
        """``submit_program`` through this cluster's client runtime."""
        return submit_program(program, inputs or {}, app=self.runtime.app, **options)

    def run(self, program: Program | str, inputs: dict[str, Any] | None = None, timeout: float = 90,
            **options: Any) -> ExecutionResult:
        """Submit and wait: the result, failed or not."""
        return self.submit(program, inputs, **options).get(timeout=timeout, propagate=False)

    def cli(self, *args: str, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run `dspex-celery ARGS` against this cluster (stdout and stderr captured as text)."""
        return subprocess.run([CLI, *args], cwd=self.cwd, env=self.env(**(env or {})), capture_output=True,
                              text=True, timeout=timeout)

    def stop(self) -> None:
        """Stop the listeners and workers, and delete this namespace's keys."""
        for listener in self.listeners:
            listener.stop()
        for worker in self.workers:
            worker.stop()
        self.listeners.clear()
        self.workers.clear()
        client = self._runtime.store.client if self._runtime is not None else self._state_client()
        if client is None:
            return
        try:
            purge_namespace(client, self.settings.namespace)
        except (redis.ConnectionError, redis.exceptions.RedisClusterException):
            pass  # a Redis (or Redis Cluster) that is gone (a test's own, stopped) holds no keys to delete

    def _state_client(self) -> Any:
        url = self.settings.state_url
        return connect(url, sentinel_master=self.settings.sentinel_master) if url else None


@dataclass
class RedisServer:
    """A `redis-server` of the caller's own on a free loopback port (no persistence), to restart at will."""

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
        """Start it (again) and return once it answers."""
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


def _redis_server(port: int, workdir: Path, *extra: str) -> subprocess.Popen[bytes]:
    """A `redis-server` on loopback ``port`` without persistence, its files in ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(workdir), *extra]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _answers(port: int) -> bool:
    try:
        return bool(redis.Redis(port=port, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def _terminate(processes: Sequence[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


@dataclass
class RedisClusterServers:
    """A Redis Cluster of ``masters`` masters (no replicas) on free loopback ports, in ``tmp``."""

    tmp: Path
    masters: int = 3
    ports: list[int] = field(default_factory=list)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def url(self) -> str:
        """``redis-cluster://127.0.0.1:P1,127.0.0.1:P2,...``"""
        return "redis-cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports)

    def start(self) -> RedisClusterServers:
        """Start the servers, join them (``redis-cli --cluster create``) and return once every slot is served."""
        self.ports = [free_cluster_port() for _ in range(self.masters)]
        for port in self.ports:
            self.processes.append(_redis_server(port, self.tmp / str(port), "--cluster-enabled", "yes",
                                                "--cluster-config-file", f"nodes-{port}.conf",
                                                "--cluster-node-timeout", "2000"))
        wait_for(lambda: all(_answers(port) for port in self.ports), timeout=10, what="the cluster's nodes")
        nodes = [f"127.0.0.1:{port}" for port in self.ports]
        subprocess.run(["redis-cli", "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, capture_output=True, timeout=30)
        wait_for(self._ok, timeout=20, what="cluster_state:ok on every node")
        return self

    def _ok(self) -> bool:
        return all(redis.Redis(port=port).cluster("info").get("cluster_state") == "ok" for port in self.ports)

    def stop(self) -> None:
        _terminate(self.processes)
        self.processes.clear()


@dataclass
class SentinelServers:
    """A Sentinel set-up on free loopback ports: a master, one replica and one sentinel watching it as
    ``master_name`` (quorum 1, a master is down after ``down_after_ms``)."""

    tmp: Path
    master_name: str = "dspex"
    down_after_ms: int = 1000
    master_port: int = field(default_factory=free_port)
    replica_port: int = field(default_factory=free_port)
    sentinel_port: int = field(default_factory=free_port)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def url(self, db: int = 0) -> str:
        """``sentinel://127.0.0.1:PORT/DB`` (with :attr:`master_name` as the settings' sentinel_master)."""
        return f"sentinel://127.0.0.1:{self.sentinel_port}/{db}"

    def start(self) -> SentinelServers:
        """Start master, replica (in sync) and sentinel; return once the sentinel knows the replica."""
        self.processes["master"] = _redis_server(self.master_port, self.tmp / "master")
        self.processes["replica"] = _redis_server(self.replica_port, self.tmp / "replica",
                                                  "--replicaof", "127.0.0.1", str(self.master_port))
        wait_for(lambda: _answers(self.master_port) and _answers(self.replica_port), timeout=10, what="master and replica")
        wait_for(self._replica_in_sync, timeout=15, what="the replica in sync")
        config = self.tmp / "sentinel.conf"
        config.write_text(
            f"port {self.sentinel_port}\nbind 127.0.0.1\ndir {self.tmp}\n"
            f"sentinel monitor {self.master_name} 127.0.0.1 {self.master_port} 1\n"
            f"sentinel down-after-milliseconds {self.master_name} {self.down_after_ms}\n"
            f"sentinel failover-timeout {self.master_name} 10000\n"
            f"sentinel parallel-syncs {self.master_name} 1\n"
        )
        self.processes["sentinel"] = subprocess.Popen(["redis-server", str(config), "--sentinel"],
                                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self._sentinel_sees_replica, timeout=20, what="the sentinel to discover the replica")
        return self

    def _replica_in_sync(self) -> bool:
        info = redis.Redis(port=self.replica_port).info("replication")
        return info.get("master_link_status") == "up"

    def _sentinel_sees_replica(self) -> bool:
        try:
            replicas = redis.Redis(port=self.sentinel_port).sentinel_slaves(self.master_name)
        except redis.RedisError:
            return False
        return any(int(replica.get("port", 0)) == self.replica_port and not replica.get("is_sdown")
                   and not replica.get("is_disconnected") for replica in replicas)

    def master_port_now(self) -> int:
        """The port of the server the sentinel calls master now."""
        address: Any = redis.Redis(port=self.sentinel_port).sentinel_get_master_addr_by_name(self.master_name)
        return int(address[1])

    def kill_master(self) -> None:
        """SIGKILL the master (no goodbye to its clients); the sentinel promotes the replica."""
        master = self.processes["master"]
        master.kill()
        master.wait(timeout=10)

    def restore_replica(self) -> None:
        """After :meth:`kill_master` and the promotion: start the dead master again as the new master's
        replica (roles swapped), so the set-up can fail over once more."""
        wait_for(lambda: self.master_port_now() == self.replica_port, timeout=30, what="the replica's promotion")
        self.master_port, self.replica_port = self.replica_port, self.master_port
        self.processes["master"] = self.processes["replica"]
        self.processes["replica"] = _redis_server(self.replica_port, self.tmp / f"replica-{self.replica_port}",
                                                  "--replicaof", "127.0.0.1", str(self.master_port))
        wait_for(self._replica_in_sync, timeout=15, what="the new replica in sync")
        wait_for(self._sentinel_sees_replica, timeout=20, what="the sentinel to discover the new replica")

    def stop(self) -> None:
        _terminate(list(self.processes.values()))
        self.processes.clear()
