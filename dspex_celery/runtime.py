"""The runtime: settings, Celery app, state store and hooks of one process, found from a task."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import redis
from celery import Celery

from dspex_celery.app import make_app
from dspex_celery.errors import BrokerUnreachable
from dspex_celery.hooks import HookChain
from dspex_celery.redis_queues import RedisQueues
from dspex_celery.settings import Settings, load_settings, redact
from dspex_celery.state import StateStore


#: Seconds a successful reachability check is trusted before the next submission checks again.
REACHABLE_TTL_S = 10.0


@dataclass
class Runtime:
    """What every task and client call of one process shares."""

    settings: Settings
    app: Celery
    store: StateStore
    hooks: HookChain
    allowed: set[str] = field(default_factory=set)
    embedded_worker: Any = None
    reachable_until: float = 0.0
    #: The broker's queues when state-store scripts can write them (Redis broker on the store's db).
    queues: RedisQueues | None = None

    @property
    def allowed_packages(self) -> tuple[str, ...]:
        return tuple(sorted(self.allowed))

    def check_reachable(self) -> None:
        """Fail with one clear line when the broker or the state store does not answer.

        A success is trusted for :data:`REACHABLE_TTL_S`, so batches of submissions pay it once.
        """
        if time.monotonic() < self.reachable_until:
            return
        self._ping_backend()
        self._ping_broker()
        self.reachable_until = time.monotonic() + REACHABLE_TTL_S

    def _ping_backend(self) -> None:
        try:
            self.store.client.ping()
        except redis.RedisError as exc:
            raise BrokerUnreachable(
                f"cannot reach the result backend at {redact(self.settings.state_url)} ({_reason(exc)}): "
                "start Redis or pass --result-backend URL"
            ) from None

    def _ping_broker(self) -> None:
        try:
            with self.app.connection_for_write() as connection:
                connection.ensure_connection(max_retries=1, timeout=3)
        except Exception as exc:  # kombu raises many transport-specific errors
            raise BrokerUnreachable(
                f"cannot reach the broker at {redact(self.settings.broker_url)} ({_reason(exc)}): "
                "start it or pass --broker URL"
            ) from None


def _reason(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def create_runtime(settings: Settings | None = None) -> Runtime:
    """A runtime for ``settings`` (embedded when no broker is configured); its app knows it."""
    settings = settings or load_settings()
    app = make_app(settings)
    if settings.embedded:
        store = StateStore.in_memory(settings.namespace, settings.state_ttl_s)
    else:
        assert settings.state_url is not None  # make_app checked it
        store = StateStore.from_url(settings.state_url, settings.namespace, settings.state_ttl_s)
    runtime = Runtime(settings, app, store, default_hooks(settings), set(settings.allowed_packages),
                      queues=RedisQueues.of(settings, app))
    app.dspex_runtime = runtime
    return runtime


def default_hooks(settings: Settings) -> HookChain:
    """The hooks every runtime installs (extended by later features)."""
    from dspex_celery.breaker import CircuitBreaker
    from dspex_celery.history.hooks import history_hooks
    from dspex_celery.resources import limiter_hooks

    # The breaker first: an open circuit fails the attempt before it waits for a resource slot.
    return HookChain([CircuitBreaker(), *limiter_hooks(settings.resources), *history_hooks(settings)])


def runtime_of(app: Celery) -> Runtime:
    """The runtime a dspex Celery app was created with."""
    return app.dspex_runtime


_default_lock = threading.Lock()
_default: Runtime | None = None


def default_runtime() -> Runtime:
    """The process-wide runtime from settings (created on first use)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = create_runtime()
        return _default
