"""kombu's Redis transport with one reusable client per channel for publishing.

kombu builds a new ``redis.Redis`` object for every message it publishes and every event it fans
out (``Channel.conn_or_acquire``); constructing one (its response-callback table) costs more CPU
than sending the message. A client over the channel's connection pool holds no per-command state
and is thread-safe, so one per channel is enough. Used for ``redis://`` and ``rediss://`` brokers.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis

#: The value of Celery's ``broker_transport`` setting that selects this transport.
TRANSPORT = "dspex_celery.transport:Transport"


class Channel(kombu_redis.Channel):
    """A Redis channel whose synchronous client is created once."""

    _publish_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)
        if self._publish_client is None:
            self._publish_client = super()._create_client()
        return self._publish_client


class Transport(kombu_redis.Transport):
    """kombu's Redis transport, with :class:`Channel`."""

    Channel = Channel
