"""The Celery app: JSON only, late acks, one queue per resource class, events on."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import redis
from celery import Celery
from celery.backends.redis import RedisBackend, SentinelBackend
from celery.exceptions import BackendError
from kombu.exceptions import EncodeError, OperationalError

from dspex_celery import defaults
from dspex_celery.errors import ConfigError
from dspex_celery.redis_clients import (
    CLUSTER_SCHEMES,
    SENTINEL_SCHEMES,
    connect,
    failover_retry,
    is_sentinel_url,
    require_master,
)
from dspex_celery.routing import PRIORITY_LEVELS, control_queue
from dspex_celery.settings import Settings, redact
from dspex_celery.transport import TRANSPORT, transport_options

log = logging.getLogger(__name__)

#: Errors of a result write that are the store's (or the result's), not the message's: Celery handles
#: them (retries, a result that is not JSON recorded as the task's failure).
_STORE_ERRORS: tuple[type[BaseException], ...] = (redis.RedisError, OSError, OperationalError, BackendError,
                                                  EncodeError)

#: Celery's ``worker_consumer``: drops the task messages Celery cannot take in (imported by workers only).
WORKER_CONSUMER = "dspex_celery.consumer:Consumer"


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings for a deployment (or for the in-process embedded worker)."""
    config: dict[str, Any] = {
        "broker_url": settings.broker_url or "memory://localhost/",
        "result_backend": _result_backend(settings),
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_send_task_events": False,  # as in Celery: `worker -E`, or Flower turns them on
        "task_send_sent_event": settings.sent_events,
        "task_track_started": True,
        "task_default_queue": control_queue(settings.namespace),
        "result_expires": settings.state_ttl_s,
        "result_extended": True,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {
            "visibility_timeout": settings.visibility_timeout_s,
            # Redis: one list per priority, the most urgent (0) consumed first.
            "priority_steps": list(range(PRIORITY_LEVELS)),
        },
        # AMQP: declare queues with priorities (higher first).
        "task_queue_max_priority": PRIORITY_LEVELS - 1,
        "task_default_priority": PRIORITY_LEVELS // 2,
        "result_backend_transport_options": {"visibility_timeout": settings.visibility_timeout_s},
        "worker_hijack_root_logger": False,
        "worker_consumer": WORKER_CONSUMER,
        "enable_utc": True,
    }
    if str(settings.broker_url).startswith(("redis://", "rediss://")):
        config["broker_transport"] = TRANSPORT
        config["broker_transport_options"].update(transport_options(settings.namespace, settings.visibility_timeout_s))
    if is_sentinel_url(settings.broker_url):  # kombu's Sentinel transport, with this deployment's unacked keys
        config["broker_transport_options"].update(transport_options(settings.namespace, settings.visibility_timeout_s))
        config["broker_transport_options"]["master_name"] = require_master(settings.broker_url, settings.sentinel_master)
    if not settings.embedded and is_sentinel_url(settings.state_url):
        config["result_backend_transport_options"]["master_name"] = require_master(settings.state_url,
                                                                                   settings.sentinel_master)
    if settings.embedded:
        config["broker_transport_options"]["polling_interval"] = defaults.EMBEDDED_POLL_S
        config["result_chord_retry_interval"] = defaults.EMBEDDED_POLL_S
    return config


def _result_backend(settings: Settings) -> str:
    if settings.embedded:
        return "cache+memory://"
    if settings.state_url is None:
        raise ConfigError(
            f"no Redis result backend for broker {redact(settings.broker_url)}: set DSPEX_RESULT_BACKEND "
            "(or --result-backend) to a redis:// URL; the execution state store lives there"
        )
    if not settings.state_url.startswith(("redis://", "rediss://", "unix://", *CLUSTER_SCHEMES, *SENTINEL_SCHEMES)):
        raise ConfigError(
            f"result backend {redact(settings.state_url)} is not Redis: dspex-celery keeps execution "
            "state in the result backend and needs a redis://, redis-cluster:// or sentinel:// URL"
        )
    return settings.state_url


_unsubscribed: ContextVar[bool] = ContextVar("dspex_unsubscribed_dispatch", default=False)


@contextlib.contextmanager
def unsubscribed_dispatch() -> Iterator[None]:
    """Send tasks without subscribing this process to their results (see :class:`RedisResultBackend`)."""
    token = _unsubscribed.set(True)
    try:
        yield
    finally:
        _unsubscribed.reset(token)


class RedisResultBackend(RedisBackend):
    """Celery's Redis result backend, except for tasks sent within :func:`unsubscribed_dispatch`.

    Celery subscribes a sender to the results of the tasks (and canvas members) it sends, for a later
    ``AsyncResult.get`` that a dspex client never makes (it waits on the execution's own result); a
    subscription the garbage collector drops while Redis is down retries for 20 s, with tracebacks.
    """

    def store_result(self, task_id: Any, result: Any, state: str, *args: Any, **kwargs: Any) -> Any:
        with _message_errors_logged("store the result of", task_id):
            return super().store_result(task_id, result, state, *args, **kwargs)
        return result  # what Celery's own store_result returns, when the message's fields made it fail

    def mark_as_done(self, task_id: Any, *args: Any, **kwargs: Any) -> None:
        with _message_errors_logged("finish (chord, callbacks)", task_id):
            super().mark_as_done(task_id, *args, **kwargs)

    def mark_as_failure(self, task_id: Any, *args: Any, **kwargs: Any) -> None:
        with _message_errors_logged("record the failure (errbacks, chord) of", task_id):
            super().mark_as_failure(task_id, *args, **kwargs)

    def on_task_call(self, producer: Any, task_id: str) -> None:
        if not _unsubscribed.get():
            super().on_task_call(producer, task_id)

    def add_pending_result(self, result: Any, weak: bool = False, start_drainer: bool = True) -> Any:
        if _unsubscribed.get():
            return result
        return super().add_pending_result(result, weak=weak, start_drainer=start_drainer)


@contextlib.contextmanager
def _message_errors_logged(what: str, task_id: Any) -> Iterator[None]:
    """Log (and swallow) an error a task message's own fields cause in Celery's result handling.

    Celery stores results and calls errbacks and chord callbacks with the ids, stamps and signatures a
    message carries; one that anyone with queue access forged (a task id that is None, an errback with
    arguments its task does not take) raises there, outside the task, and its message is then never
    acknowledged: it holds a worker slot for good. Logged here, the message is acknowledged as usual.
    Errors of the store itself (:data:`_STORE_ERRORS`) propagate: Celery retries them.
    """
    try:
        yield
    except _STORE_ERRORS:
        raise
    except Exception as exc:
        log.error("task %r: cannot %s it (%s: %s); its message's fields are not what Celery sends, "
                  "left out", task_id, what, type(exc).__name__, exc)


class SentinelResultBackend(RedisResultBackend, SentinelBackend):
    """Celery's Sentinel result backend (the master named in ``master_name``), subscribing as above;
    its commands (a chord's count, a stored result) are retried through a failover."""

    def _get_pool(self, **params: Any) -> Any:
        pool = super()._get_pool(**params)
        pool.connection_kwargs.update(failover_retry())
        return pool


class ClusterResultBackend(RedisResultBackend):
    """The Redis result backend on a Redis Cluster (Celery has none built in): a ``RedisCluster``
    client, a group's keys (``celery-taskset-meta-{GROUP}.j``, ``.t``, ...) under one hash tag, so
    Celery's chord scripts touch one slot, ``mget`` split by slot, and a result stored, then published
    (no pipeline) on the task's channel; a cluster's PUBLISH reaches subscribers on every node."""

    def _params_from_url(self, url: str, defaults: dict[str, Any]) -> dict[str, Any]:
        return {"url": url}

    def as_uri(self, include_password: bool = False) -> str:
        return str(self.url) if include_password else redact(self.url)

    def _create_client(self, **params: Any) -> Any:
        return connect(params["url"], decode_responses=False)

    def get_key_for_group(self, group_id: str, key: str = "") -> Any:
        return super().get_key_for_group(f"{{{group_id}}}", key)

    def mget(self, keys: list[Any]) -> Any:
        return self.client.mget_nonatomic(keys)

    def _set(self, key: Any, value: Any, expires: int | None = None) -> None:
        """Store, then publish (a cluster pipeline cannot publish)."""
        expires = self.expires if expires is None else expires
        self.client.set(key, value, ex=expires or None)
        self.client.publish(key, value)


def make_app(settings: Settings) -> Celery:
    """A Celery app configured for ``settings`` (``bootstrap.create_runtime`` registers the tasks)."""
    app = Celery(f"dspex-{settings.namespace}", set_as_current=False)
    backend = f"{__name__}:{RedisResultBackend.__name__}"
    app.loader.override_backends = {
        "redis": backend, "rediss": backend, "sentinel": f"{__name__}:{SentinelResultBackend.__name__}",
        **{scheme.removesuffix("://"): f"{__name__}:{ClusterResultBackend.__name__}" for scheme in CLUSTER_SCHEMES},
    }
    app.conf.update(celery_config(settings))
    return app
