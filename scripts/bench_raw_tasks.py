"""Plain Celery tasks for the raw-canvas baseline: load them with ``dspex-celery worker --include bench_raw_tasks``."""

from __future__ import annotations

from celery import shared_task

NOOP = "bench.raw.noop"


@shared_task(name=NOOP, ignore_result=False)
def noop() -> None:
    """Do nothing: what a hand-written chain-of-chords costs per task."""
