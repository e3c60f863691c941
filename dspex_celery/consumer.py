"""The worker's consumer: a task message Celery cannot take in is dropped, not fatal.

Celery's consumer handles the bodies it cannot decode and content types it does not accept, but an
error while it turns a message into a request (a task message without an ``id`` header, ...)
raises out of its event loop, and the worker stops for good (on any broker). Such a message is
rejected here (RabbitMQ discards it, or dead-letters it when its queue has a dead-letter exchange)
with one error line naming the queue and the reason; the worker goes on. Selected by Celery's
``worker_consumer`` setting, so only workers import it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer
from kombu.exceptions import MessageStateError
from kombu.message import Message

from dspex_celery.transport import describe

log = logging.getLogger(__name__)


class Consumer(CeleryConsumer):
    """Celery's consumer, whose task handler drops a message it fails on instead of raising."""

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Callable[[Message], Any]:
        on_task_received = super().create_task_handler(*args, **kwargs)

        def guarded(message: Message) -> Any:
            try:
                return on_task_received(message)
            except Exception as exc:
                if self.is_broker_error(exc):
                    raise  # the consumer reconnects
                self.drop(message, exc)
                return None

        return guarded

    def is_broker_error(self, error: Exception) -> bool:
        """True for an error of the broker connection. kombu's Redis transport counts any ``KeyError``
        as one (a stale socket's channel); one raised while a message is taken in is the message's."""
        errors = (*self.connection_errors, *self.channel_errors)
        return isinstance(error, errors) and not isinstance(error, KeyError)

    def drop(self, message: Message, error: Exception) -> None:
        """Reject ``message`` (it does not come back) with an error line."""
        queue = (message.delivery_info or {}).get("routing_key", "?")
        log.error("dropped a message from queue %s: Celery cannot take it in (%s: %s); its headers were %s, "
                  "its body %s", queue, type(error).__name__, error, message.headers, describe(message.body))
        try:
            message.reject_log_error(log, self.connection_errors)
        except MessageStateError:  # acknowledged or rejected already
            pass
