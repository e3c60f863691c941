"""Celery task messages written straight into kombu's Redis queues, by a Lua step of the state store.

When the broker is Redis on the state store's server and database, ``dag`` pushes the children a
module makes ready inside the script that stores the module's output and counts its children. The
readiness decision and the dispatch are then one atomic step: a worker that dies right after the
script cannot lose a child, and no Celery publish follows it (one round trip, no client-side send).

Each message is the one ``apply_async`` would send: protocol-2 headers from Celery's own
``app.amqp.as_task_v2`` in kombu's Redis envelope, LPUSHed on the list kombu reads for that queue
and priority. What bypasses Celery's publish path: the ``before_task_publish`` /
``after_task_publish`` signals and ``task-sent`` events; with sent events on
(``DSPEX_SENT_EVENTS``), dag publishes through Celery instead (:meth:`RedisQueues.of` is None).
"""

from __future__ import annotations

import base64
import json
import uuid
from bisect import bisect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from celery import Celery
from celery.canvas import Signature
from kombu.serialization import dumps
from kombu.transport import redis as kombu_redis
from redis.connection import parse_url

from dspex_celery.settings import Settings

#: What kombu's Redis transport puts between a queue's name and a priority in its list keys.
PRIORITY_SEPARATOR: str = kombu_redis.Channel.sep
#: Publishing defaults of Celery's task queues (persistent messages, anonymous exchange).
DELIVERY_MODE = 2
#: The envelope field a message's lead is written in, first, so a script reads it without decoding the
#: message (kombu reads the envelope's own fields and ignores this one).
LEAD_KEY = "dspex"
#: The envelope field after the lead: the digest of the message's plan text (see ``plan_digest``).
PLAN_LEAD_KEY = "dspex_plan"
#: The envelope field after those: the begin spec of the module's first attempt (``StateStore.begin_spec``).
BEGIN_LEAD_KEY = "dspex_begin"


@dataclass(frozen=True)
class RedisQueues:
    """How to write a Celery message into a queue of a Redis broker (the state store's Redis)."""

    app: Celery
    priority_steps: tuple[int, ...]

    @classmethod
    def of(cls, settings: Settings, app: Celery) -> RedisQueues | None:
        """The queues of ``settings``' broker when a state-store script can write them, else None."""
        options = app.conf.broker_transport_options or {}
        if (settings.embedded or settings.sent_events or options.get("global_keyprefix")
                or not _same_redis(settings.broker_url, settings.state_url)):
            return None
        steps = options.get("priority_steps", kombu_redis.PRIORITY_STEPS)
        return cls(app, tuple(sorted(steps)))

    def key(self, queue: str, priority: int) -> str:
        """The Redis list holding ``queue``'s messages of ``priority`` (kombu's ``_q_for_pri``)."""
        step = self.priority_steps[bisect(self.priority_steps, priority) - 1]
        return f"{queue}{PRIORITY_SEPARATOR}{step}" if step else queue

    def message(self, signature: Signature, lead: Mapping[str, Any] | None = None) -> tuple[str, str]:
        """The queue key and the message that ``signature.apply_async(ignore_result=True)`` would push,
        sent from the task running in this thread (its root and parent ids, as Celery sets them; the
        signature's ``headers`` option added to Celery's, as ``apply_async(headers=...)`` adds them);
        ``lead``: fields put first in the envelope, in order (short strings: no quote or backslash, or
        lists of them), such as :data:`LEAD_KEY`, :data:`PLAN_LEAD_KEY` and :data:`BEGIN_LEAD_KEY`."""
        options = signature.options
        task_id = str(options["task_id"])
        parent = self.app.current_worker_task
        root_id = parent_id = None
        if parent is not None:
            root_id = parent.request.root_id or parent.request.id
            parent_id = parent.request.id
        task = self.app.amqp.as_task_v2(
            task_id, signature.task, signature.args, signature.kwargs,
            shadow=options.get("shadow"), time_limit=options.get("time_limit"),
            soft_time_limit=options.get("soft_time_limit"), root_id=root_id, parent_id=parent_id,
            argsrepr=options.get("argsrepr"), kwargsrepr=options.get("kwargsrepr"), ignore_result=True,
        )
        content_type, content_encoding, body = dumps(task.body, serializer="json")
        queue = str(options["queue"])
        priority = int(options["priority"])
        properties: dict[str, Any] = {
            **task.properties,
            "reply_to": task.properties.get("reply_to") or self.app.thread_oid,
            "delivery_mode": DELIVERY_MODE,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": priority,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        }
        payload: dict[str, Any] = dict(lead or {})
        payload |= {
            "body": base64.b64encode(body.encode() if isinstance(body, str) else body).decode(),
            "content-encoding": content_encoding,
            "content-type": content_type,
            "headers": {**task.headers, **options["headers"]} if "headers" in options else task.headers,
            "properties": properties,
        }
        return self.key(queue, priority), json.dumps(payload)


def _same_redis(broker_url: str | None, state_url: str | None) -> bool:
    """True when both URLs are Redis and name the same server and database (never a Redis Cluster or a
    Sentinel-managed store: a cluster's script may not write a queue's key, in another slot)."""
    if not broker_url or not state_url or not all(url.startswith(("redis://", "rediss://")) for url in (broker_url, state_url)):
        return False
    try:
        broker, state = parse_url(broker_url), parse_url(state_url)
    except ValueError:
        return False
    defaults = {"host": None, "port": 6379, "path": None, "db": 0, "username": None}  # parse_url gives ints
    return all(broker.get(key, value) == state.get(key, value) for key, value in defaults.items())
