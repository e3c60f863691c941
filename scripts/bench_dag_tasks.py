"""Plain Celery task for the raw-canvas baseline of ``bench_dag.py``: sleeps like ``synthetic.work``.

Loaded by ``dspex-celery worker --include bench_dag_tasks``. Each call stores its own start and end
(epoch seconds) in a Redis hash named by the caller, so makespans are measured the same way as
from dspex module records (first start to last end).
"""

from __future__ import annotations

import json
import os
import time
from functools import cache

import redis
from celery import shared_task

SLEEP = "bench.dag.sleep"
TIMES_TTL_S = 900


@cache
def _client() -> redis.Redis:
    return redis.Redis.from_url(os.environ.get("DSPEX_BROKER_URL", "redis://127.0.0.1:6379/4"))


@shared_task(name=SLEEP, ignore_result=False)
def sleep(ms: float, times_key: str, name: str) -> None:
    """Sleep ``ms`` milliseconds; record ``[start, end]`` under ``name`` in the hash ``times_key``."""
    start = time.time()
    if ms > 0:
        time.sleep(ms / 1000.0)
    end = time.time()
    _client().pipeline(transaction=False).hset(times_key, name, json.dumps([start, end])).expire(
        times_key, TIMES_TTL_S).execute()
