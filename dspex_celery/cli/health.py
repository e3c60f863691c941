"""``dspex-celery ping``: the health check of a worker or a history listener (compose, Kubernetes).

A worker is healthy when its main process answers Celery's remote control (as ``celery inspect
ping`` checks) and consumes this deployment's control queue; a listener when it is reading the
history stream (its consumer in the stream's group was active within a few seconds).
"""

from __future__ import annotations

import socket

import click
import redis

from dspex_celery.cli.options import Seconds, cluster_runtime, connection_options
from dspex_celery.errors import DspexError
from dspex_celery.history.hooks import stream_key
from dspex_celery.history.listener import GROUP, default_consumer
from dspex_celery.routing import control_queue
from dspex_celery.runtime import Runtime

#: A listener blocks one second per read, so its consumer is idle for about that long at most.
LISTENER_IDLE_MAX_MS = 10_000


class Unhealthy(DspexError):
    """The process a health check looked for does not answer (exit status 1)."""


@click.command()
@connection_options
@click.option("--node", default=None, metavar="NAME",
              help="The worker's node name (default: any worker on this host, e.g. dspex-default-1@HOST).")
@click.option("--listener", "check_listener", is_flag=True,
              help="Check the history listener on this host instead (consumer listener@HOST).")
@click.option("--consumer", default=None, help="The listener's consumer name (default: listener@HOST).")
@click.option("--timeout", type=Seconds(min=0.1), default=3.0, show_default=True,
              help="Seconds to wait for the workers' replies.")
def ping(broker: str | None, result_backend: str | None, node: str | None, check_listener: bool,
         consumer: str | None, timeout: float) -> None:
    """Exit 0 when a worker (or --listener) of this deployment on this host answers; 1 when none does."""
    runtime = cluster_runtime(broker, result_backend, "ping")
    if check_listener:
        click.echo(listener_alive(runtime, consumer or default_consumer()))
    else:
        click.echo(worker_alive(runtime, node, timeout))


def worker_alive(runtime: Runtime, node: str | None, timeout: float) -> str:
    """``pong from NODE`` for the first worker of this namespace that answers (on this host unless
    ``node`` names one); raises :class:`Unhealthy` when none does."""
    replies = runtime.app.control.inspect(timeout=timeout, destination=[node] if node else None).active_queues()
    queue = control_queue(runtime.settings.namespace)
    host = f"@{socket.gethostname()}"
    for name, queues in sorted((replies or {}).items()):
        serves = any(entry.get("name") == queue for entry in queues or [])
        if serves and (node is not None or name.endswith(host)):
            return f"pong from {name}"
    where = f"worker {node}" if node else f"a worker on {socket.gethostname()}"
    raise Unhealthy(f"no answer from {where} consuming {queue} within {timeout:g} s: is it running, "
                    "on this broker and namespace?")


def listener_alive(runtime: Runtime, consumer: str) -> str:
    """``listener CONSUMER reading STREAM`` when that consumer read the history stream lately."""
    stream = stream_key(runtime.settings.namespace)
    client = runtime.store.client
    try:
        consumers = client.xinfo_consumers(stream, GROUP)
    except redis.ResponseError:  # no stream or no group yet: no listener ever joined
        consumers = []
    for entry in consumers:
        name = entry["name"].decode() if isinstance(entry["name"], bytes) else entry["name"]
        if name == consumer and int(entry.get("idle", LISTENER_IDLE_MAX_MS)) < LISTENER_IDLE_MAX_MS:
            return f"listener {consumer} reading {stream}"
    raise Unhealthy(f"listener {consumer} is not reading {stream} (group {GROUP}): is it running, "
                    "on this Redis and namespace?")
