"""kombu's Redis transport with one reusable client per channel for publishing, and a consumer that
survives messages it cannot decode.

kombu builds a new ``redis.Redis`` object for every message it publishes and every event it fans
out (``Channel.conn_or_acquire``); constructing one (its response-callback table) costs more CPU
than sending the message. A client over the channel's connection pool holds no per-command state
and is thread-safe, so one per channel is enough. Used for ``redis://`` and ``rediss://`` brokers.

kombu decodes a popped message inside the worker's event loop: a list entry that is not a kombu
envelope (not JSON, a body that is not valid base64, no delivery tag, ...) raises out of it and
Celery stops the worker for good. Here such a message is dropped with one error line naming the
queue, the reason and its first bytes; the worker goes on with the next one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

from dspex_celery import defaults

log = logging.getLogger(__name__)

#: The value of Celery's ``broker_transport`` setting that selects this transport.
TRANSPORT = "dspex_celery.transport:Transport"
#: How many bytes of a dropped message its log line shows.
SHOWN_BYTES = 120


class BadMessage(ValueError):
    """A queue entry that is not a kombu message envelope a worker can take in."""


def envelope(raw: bytes | str, codecs: Mapping[str, Any]) -> dict[str, Any]:
    """The kombu envelope stored in a queue entry, checked for what delivering it needs (kombu
    indexes these fields without checking; ``codecs``: the channel's body codecs by name);
    :class:`BadMessage` says what is wrong."""
    try:
        payload = loads(bytes_to_str(raw))
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise BadMessage(f"not JSON ({exc})") from None
    if not isinstance(payload, dict):
        raise BadMessage(f"not a message envelope (a JSON {type(payload).__name__})")
    properties = payload.get("properties")
    if not isinstance(properties, dict) or not isinstance(properties.get("delivery_tag"), str):
        raise BadMessage("not a message envelope (no properties.delivery_tag)")
    info = properties.get("delivery_info")
    if not isinstance(info, dict) or "exchange" not in info or "routing_key" not in info:
        raise BadMessage("not a message envelope (no properties.delivery_info with exchange and routing_key)")
    if not isinstance(payload.get("headers") or {}, dict):
        raise BadMessage("its headers are not a mapping")
    body, encoding = payload.get("body"), properties.get("body_encoding")
    if body and encoding and str(encoding).lower() != "utf-8":  # as kombu's Channel.decode_body
        codec = codecs.get(encoding)
        if codec is None:
            raise BadMessage(f"unknown body encoding {encoding!r}")
        try:
            codec.decode(body)
        except Exception as exc:  # binascii.Error, a body that is not a string...
            raise BadMessage(f"its body is not valid {encoding} ({type(exc).__name__}: {exc})") from None
    return payload


def describe(raw: object) -> str:
    """The first bytes of a message (or body) and its size, for a log line."""
    data = raw if isinstance(raw, bytes) else str(raw).encode(errors="replace")
    shown = data[:SHOWN_BYTES]
    return f"{shown!r}{'...' if len(data) > len(shown) else ''} ({len(data)} bytes)"


def transport_options(namespace: str, visibility_timeout_s: float) -> dict[str, Any]:
    """Options of this transport for a deployment: its own unacked-message keys (kombu's default ones
    are shared by every deployment on the Redis database, so a worker with a short visibility timeout
    would re-queue another deployment's running messages), and the restore sweep of
    :func:`restore_options`."""
    prefix = f"{namespace}." if namespace else ""
    keys = {option: f"{prefix}{option.removesuffix('_key')}"
            for option in ("unacked_key", "unacked_index_key", "unacked_mutex_key")}
    return {**keys, **restore_options(visibility_timeout_s)}


def restore_interval(visibility_timeout_s: float) -> float:
    """Seconds between the sweeps that re-queue messages of dead workers: a quarter of the visibility
    timeout (a message comes back at most 1.25 x that after its delivery), 1 to 10 s."""
    return min(defaults.MAX_RESTORE_INTERVAL_S, max(1.0, visibility_timeout_s / 4))


def restore_options(visibility_timeout_s: float) -> dict[str, Any]:
    """kombu Redis transport options for the unacked-message restore sweep, from the visibility timeout.

    kombu sweeps every ``unacked_restore_interval`` (10 s) but scans only every
    ``unacked_restore_throttle``-th (10th) time: a dead worker's message came back up to 100 s after
    its visibility timeout. Here every sweep scans. ``unacked_mutex_expire`` (kombu: 300 s) is how
    long a worker killed during its sweep blocks the others' sweeps: one interval here (sweeps that
    overlap are safe: each message is restored in a transaction).
    """
    interval = restore_interval(visibility_timeout_s)
    return {
        "unacked_restore_interval": interval,
        "unacked_restore_throttle": 1,
        "unacked_mutex_expire": math.ceil(interval),
    }


class Channel(kombu_redis.Channel):
    """A Redis channel whose synchronous client is created once, and whose consumer drops what it
    cannot decode."""

    _publish_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)
        if self._publish_client is None:
            self._publish_client = super()._create_client()
        return self._publish_client

    def _brpop_read(self, **options: Any) -> bool:
        """kombu's ``_brpop_read``, except that the message is decoded by :meth:`_take_in`."""
        try:
            try:
                reply = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()  # the next iteration reconnects
                raise
            if not reply:
                raise kombu_redis.Empty()
            key, raw = reply
            queue = bytes_to_str(key).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(queue)
            self._take_in(queue, raw)
            return True
        finally:
            self._in_poll = False  # no BRPOP in flight (kombu: None)
            flush_reauth = getattr(self, "_flush_brpop_reauth", None)  # kombu 5.7 on
            if flush_reauth is not None:
                flush_reauth()

    def _take_in(self, queue: str, raw: bytes) -> None:
        """Deliver a popped message, or drop it with an error line when it cannot be taken in."""
        try:
            payload = envelope(raw, self.codecs)
        except BadMessage as exc:
            log.error("dropped a message from queue %s: %s; it was %s", queue, exc, describe(raw))
            return
        self.connection._deliver(payload, queue)  # what Celery cannot take in, its consumer drops


class Transport(kombu_redis.Transport):
    """kombu's Redis transport, with :class:`Channel`."""

    Channel = Channel
