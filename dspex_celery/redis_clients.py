"""Redis clients of the state store: one server, a Redis Cluster, or a master that Sentinel manages.

URLs (the result backend, ``--result-backend`` / ``DSPEX_RESULT_BACKEND``):

- ``redis://``, ``rediss://``, ``unix://``: one server (redis-py's ``Redis.from_url``);
- ``redis-cluster://[[user]:password@]host:port[,host:port...]``: a Redis Cluster, from any of
  its nodes (``rediss-cluster://`` with TLS); redis-py's ``RedisCluster`` follows the slots;
- ``sentinel://[[user]:password@]host:port[/db][;sentinel://host:port...]`` (Celery's syntax): the
  master named by the ``sentinel_master`` setting (``DSPEX_SENTINEL_MASTER``), looked up again
  after a failover (redis-py's ``Sentinel(...).master_for(name)``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import hiredis
import redis
from redis._parsers.base import BaseParser
from redis.backoff import ExponentialBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException
from redis.retry import Retry
from redis.sentinel import Sentinel

from dspex_celery.errors import BrokerUnreachable, ConfigError
from dspex_celery.settings import redact

log = logging.getLogger(__name__)

CLUSTER_SCHEMES = ("redis-cluster://", "rediss-cluster://")
SENTINEL_SCHEMES = ("sentinel://",)
#: Seconds a Sentinel set-up's client tries to reach a master (failovers take a few seconds).
SENTINEL_SOCKET_TIMEOUT_S = 5.0
#: Retries of a command whose master does not answer, backing off up to this many seconds apart.
FAILOVER_RETRIES = 20
FAILOVER_BACKOFF_CAP_S = 2.0


def is_cluster_url(url: str | None) -> bool:
    return bool(url) and str(url).startswith(CLUSTER_SCHEMES)


def is_sentinel_url(url: str | None) -> bool:
    return bool(url) and str(url).startswith(SENTINEL_SCHEMES)


@dataclass(frozen=True)
class Servers:
    """Where a cluster's (or Sentinel set-up's) servers are and how to log in."""

    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None
    db: int = 0
    tls: bool = False

    def credentials(self) -> dict[str, Any]:
        return {key: value for key, value in (("username", self.username), ("password", self.password)) if value}


def parse_cluster_url(url: str) -> Servers:
    """The nodes of a ``redis-cluster://`` URL (one clear line when it names none or a bad port)."""
    scheme, _, rest = url.partition("://")
    userinfo, at, hosts = rest.partition("/")[0].rpartition("@")
    username, password = _userinfo(userinfo) if at else (None, None)
    return Servers(_nodes(hosts.split(","), url), username, password, tls=scheme.startswith("rediss"))


def parse_sentinel_url(url: str) -> Servers:
    """The sentinels of a ``sentinel://host:port[/db];sentinel://...`` URL; login and db from the first."""
    parts = [urlsplit(chunk) for chunk in url.split(";") if chunk.strip()]
    first = parts[0]
    db = first.path.strip("/") or "0"
    if not db.isdigit():
        raise ConfigError(f"sentinel URL {redact(url)}: the database '{db}' is not a number")
    nodes = _nodes([part.netloc.rpartition("@")[2] for part in parts], url)
    password = unquote(first.password) if first.password else None
    return Servers(nodes, unquote(first.username) if first.username else None, password, int(db))


def _userinfo(text: str) -> tuple[str | None, str | None]:
    user, colon, password = text.partition(":")
    return (unquote(user) or None, unquote(password) if colon else None)


def _nodes(hosts: list[str], url: str) -> tuple[tuple[str, int], ...]:
    nodes = []
    for host in (item.strip() for item in hosts):
        name, _, port = host.rpartition(":")
        if not name or not port.isdigit():
            raise ConfigError(f"{redact(url)}: '{host}' is not host:port (list nodes as host:port,host:port)")
        nodes.append((name.strip("[]"), int(port)))
    if not nodes:
        raise ConfigError(f"{redact(url)} names no server: list them as host:port")
    return tuple(nodes)


def connect(url: str, *, sentinel_master: str | None = None, decode_responses: bool = True,
            **options: Any) -> Any:
    """A redis-py client for ``url``: ``Redis``, ``RedisCluster`` or a Sentinel-managed master."""
    if is_cluster_url(url):
        return cluster_client(parse_cluster_url(url), decode_responses=decode_responses, **options)
    if is_sentinel_url(url):
        return sentinel_master_client(url, sentinel_master, decode_responses=decode_responses, **options)
    return redis.Redis.from_url(url, decode_responses=decode_responses, **options)


def cluster_client(servers: Servers, **options: Any) -> RedisCluster:
    """A client of the cluster (it asks a node for the slot map at once: none answering is one line)."""
    nodes = [ClusterNode(host, port) for host, port in servers.nodes]
    try:
        return RedisCluster(startup_nodes=nodes, ssl=servers.tls, **servers.credentials(), **options)
    except RedisClusterException as exc:
        names = ",".join(f"{host}:{port}" for host, port in servers.nodes)
        raise BrokerUnreachable(f"cannot reach the Redis Cluster at {names} ({str(exc).split('. ')[0]}): "
                                "start it or fix the redis-cluster:// URL") from None


def sentinel_master_client(url: str, master: str | None, **options: Any) -> redis.Redis:
    """The client of the master Sentinel names ``master`` (it follows failovers)."""
    servers = parse_sentinel_url(url)
    name = require_master(url, master)
    options.setdefault("socket_timeout", SENTINEL_SOCKET_TIMEOUT_S)
    options.setdefault("socket_connect_timeout", SENTINEL_SOCKET_TIMEOUT_S)
    options = {**failover_retry(), **options}
    sentinel = Sentinel(list(servers.nodes), sentinel_kwargs={"socket_timeout": SENTINEL_SOCKET_TIMEOUT_S})
    client: redis.Redis = sentinel.master_for(name, db=servers.db, **servers.credentials(), **options)
    return client


def failover_retry() -> dict[str, Any]:
    """Connection options that retry a command through a failover: each retry connects again, to the
    master the sentinels name then (up to ~30 s: Sentinel notices after ``down-after-milliseconds``)."""
    return {"retry": Retry(ExponentialBackoff(cap=FAILOVER_BACKOFF_CAP_S, base=0.1), FAILOVER_RETRIES),
            "retry_on_error": [redis.ConnectionError, redis.TimeoutError]}


def require_master(url: str | None, master: str | None) -> str:
    """The Sentinel master name a ``sentinel://`` URL needs (one clear line when it is not set)."""
    if not master:
        raise ConfigError(
            f"{redact(url)} is a Sentinel URL but no master name is set: set DSPEX_SENTINEL_MASTER "
            "(or sentinel_master: in the config file) to the name the sentinels monitor"
        )
    return master


def is_cluster_client(client: Any) -> bool:
    """True for a Redis Cluster client: a script or transaction must then keep to one hash slot."""
    return isinstance(client, RedisCluster)


#: Replicas a module task's writes must reach (on a Sentinel-managed store) before it is acknowledged.
SYNC_REPLICAS = 1
#: How long one task waits for them.
SYNC_TIMEOUT_MS = 500
#: After a wait that timed out, seconds during which tasks do not wait (the replica is down or lagging).
SYNC_DEGRADED_S = 10.0


class ReplicaSync:
    """``WAIT`` until a replica has this connection's writes, so a failover cannot lose them.

    Redis replicates asynchronously: a master that dies takes its last writes with it. A write then
    ``WAIT`` on one connection covers every earlier write of every connection (the replication stream
    is ordered). A replica that does not acknowledge within :data:`SYNC_TIMEOUT_MS` is logged and not
    waited for during :data:`SYNC_DEGRADED_S` (the master alone keeps working).
    """

    def __init__(self, client: Any, key: str) -> None:
        self.client = client
        self.key = key
        self.skip_until = 0.0

    def wait(self) -> None:
        """Return once a replica has every earlier write; raise a Redis error when the master is gone."""
        if time.monotonic() < self.skip_until:
            return
        pipe = self.client.pipeline(transaction=False)
        pipe.set(self.key, "1", ex=60)
        pipe.execute_command("WAIT", SYNC_REPLICAS, SYNC_TIMEOUT_MS)
        acknowledged = int(pipe.execute()[1])
        if acknowledged < SYNC_REPLICAS:
            self.skip_until = time.monotonic() + SYNC_DEGRADED_S
            log.warning("no replica acknowledged the state store's writes within %d ms: a failover now could lose "
                        "the last module results; not waiting for %g s", SYNC_TIMEOUT_MS, SYNC_DEGRADED_S)


class DirectLinkLost(redis.ConnectionError):
    """A thread's direct connection failed; the call goes through redis-py's own path instead."""


@dataclass(slots=True)
class _Link:
    """One thread's connection (made by redis-py, so login, TLS and the database are its) and the
    hiredis reader of its replies."""

    pid: int
    connection: Any
    sock: socket.socket
    reader: Any

    def call(self, command: tuple[Any, ...]) -> Any:
        self.sock.sendall(hiredis.pack_command(command))
        while (reply := self.reader.gets()) is False:
            data = self.sock.recv(READ_CHUNK)
            if not data:
                raise OSError("connection closed by the server")
            self.reader.feed(data)
        return reply


#: Bytes read from a direct connection at a time.
READ_CHUNK = 65536


class DirectScripts:
    """EVALSHA over a connection of the calling thread's own, packed and parsed by hiredis.

    A worker calls its store scripts thousands of times a second; redis-py's command path (the
    pool's checks, the retry wrapper, its observability hooks) costs about as much CPU per call as
    the round trip itself. Here a thread keeps one connection that redis-py made and logged in, and
    sends the command and reads its reply with hiredis, nothing else. Any failure of that connection
    (:class:`DirectLinkLost`) drops it; the caller then calls through redis-py, with its retries.
    Only for a plain ``redis.Redis`` over TCP, TLS or a Unix socket with RESP2 (:meth:`suits`).
    """

    def __init__(self, client: redis.Redis) -> None:
        self._pool = client.connection_pool
        self._decode = bool(self._pool.connection_kwargs.get("decode_responses"))
        self._local = threading.local()

    @staticmethod
    def suits(client: Any) -> bool:
        """Whether ``client`` is one server reached by a plain redis-py pool (not a cluster, Sentinel
        or an in-memory fake) that speaks RESP2."""
        pool = getattr(client, "connection_pool", None)
        return (type(client) is redis.Redis and type(pool) is redis.ConnectionPool
                and pool.connection_class in (redis.Connection, redis.SSLConnection, redis.UnixDomainSocketConnection)
                and str(pool.connection_kwargs.get("protocol") or 2) == "2")

    def evalsha(self, sha: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """The script's reply; ``NoScriptError`` / ``ResponseError`` as redis-py raises them;
        :class:`DirectLinkLost` when the connection failed (the script may or may not have run)."""
        link = self._link()
        try:
            reply = link.call(("EVALSHA", sha, len(keys), *keys, *args))
        except (OSError, hiredis.ProtocolError) as exc:
            self._drop(link)
            raise DirectLinkLost(str(exc)) from exc
        if isinstance(reply, hiredis.ReplyError):  # as redis-py raises it (NOSCRIPT -> NoScriptError, ...)
            raise BaseParser.parse_error(str(reply))
        return reply

    def _link(self) -> _Link:
        link: _Link | None = getattr(self._local, "link", None)
        if link is not None and link.pid == os.getpid():
            return link
        connection = self._pool.connection_class(**self._pool.connection_kwargs)
        try:
            connection.connect()
        except (OSError, redis.RedisError) as exc:
            raise DirectLinkLost(str(exc)) from exc
        sock = getattr(connection, "_sock", None)
        if sock is None:
            raise DirectLinkLost("no socket")
        link = _Link(os.getpid(), connection, sock, hiredis.Reader(encoding="utf-8" if self._decode else None))
        self._local.link = link
        return link

    def _drop(self, link: _Link) -> None:
        self._local.link = None
        with contextlib.suppress(Exception):
            link.connection.disconnect()
