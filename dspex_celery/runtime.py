"""The runtime: settings, Celery app, state store and hooks of one process, found from a task.

``dspex_celery.bootstrap.create_runtime`` builds one (the composition root).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import redis
from celery import Celery

from dspex_celery.errors import BrokerUnreachable, reason_of
from dspex_celery.hooks import HookChain
from dspex_celery.redis_queues import RedisQueues
from dspex_celery.results import ModuleRecord
from dspex_celery.settings import Settings, redact
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

    def write_record(self, execution_id: str, module: str, record: ModuleRecord, attempt: bool = False) -> None:
        """Store a module record (``attempt``: it ends an attempt, which is logged) and tell the hooks."""
        self.store.put_record(execution_id, module, record, attempt)
        self.hooks.on_record(execution_id, module, record)

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
                f"cannot reach the result backend at {redact(self.settings.state_url)} ({reason_of(exc)}): "
                "start Redis or pass --result-backend URL"
            ) from None

    def _ping_broker(self) -> None:
        try:
            with self.app.connection_for_write() as connection:
                connection.ensure_connection(max_retries=1, timeout=3)
        except Exception as exc:  # kombu raises many transport-specific errors
            raise BrokerUnreachable(
                f"cannot reach the broker at {redact(self.settings.broker_url)} ({reason_of(exc)}): "
                "start it or pass --broker URL"
            ) from None


def runtime_of(app: Celery) -> Runtime:
    """The runtime a dspex Celery app was created with."""
    return app.dspex_runtime
