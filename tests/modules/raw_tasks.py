"""A plain Celery task (no dspex module) that a worker loads with ``--include tests.modules.raw_tasks``."""

from __future__ import annotations

import os

from celery import shared_task

PID = "tests.raw.pid"


@shared_task(name=PID)
def pid(value: int) -> dict[str, int]:
    """Return ``value`` and the pid of the process that ran the task."""
    return {"value": value, "pid": os.getpid()}
