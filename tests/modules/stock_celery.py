"""A plain Celery app with kombu's stock Redis transport, knowing nothing of dspex_celery.

It stands in for "any Celery consumer" in the message-format contract test: its task takes the name
of the engine's module task and records what it was called with (args, kwargs, ids, time limits) in
a Redis list. Run as ``celery -A tests.modules.stock_celery worker -Q QUEUE``; configured by
``STOCK_BROKER_URL``, ``STOCK_TASK_NAME``, ``STOCK_RECORD_KEY`` and ``STOCK_PRIORITY_STEPS``
(comma-separated, as the deployment's ``priority_steps`` transport option).
"""

from __future__ import annotations

import json
import os
from typing import Any

import redis
from celery import Celery, Task


def stock_app(broker_url: str, task_name: str, record_key: str, priority_steps: list[int]) -> Celery:
    """A Celery app on ``broker_url`` whose ``task_name`` task appends its call to ``record_key``."""
    app = Celery("stock", broker=broker_url, set_as_current=False)
    app.conf.update(broker_transport_options={"priority_steps": priority_steps}, accept_content=["json"],
                    task_serializer="json", worker_hijack_root_logger=False,
                    worker_enable_remote_control=False)

    @app.task(name=task_name, bind=True, shared=False)
    def record(self: Task, *args: Any, **kwargs: Any) -> None:
        request = self.request
        call = {"args": list(args), "kwargs": kwargs, "id": request.id, "root_id": request.root_id,
                "parent_id": request.parent_id, "timelimit": list(request.timelimit or (None, None)),
                "delivery_info": {key: request.delivery_info.get(key) for key in ("exchange", "routing_key")}}
        redis.Redis.from_url(broker_url).rpush(record_key, json.dumps(call))

    return app


def _from_environment() -> Celery | None:
    if "STOCK_BROKER_URL" not in os.environ:
        return None
    steps = [int(step) for step in os.environ["STOCK_PRIORITY_STEPS"].split(",")]
    return stock_app(os.environ["STOCK_BROKER_URL"], os.environ["STOCK_TASK_NAME"], os.environ["STOCK_RECORD_KEY"], steps)


app = _from_environment()
