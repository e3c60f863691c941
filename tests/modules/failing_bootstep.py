"""A worker bootstep that fails when the worker starts: ``--include tests.modules.failing_bootstep``
makes the worker hit Celery's "Unrecoverable error" path."""

from __future__ import annotations

from typing import Any

from celery import bootsteps
from celery.signals import celeryd_init

MESSAGE = "this bootstep fails on purpose"


class FailsAtStart(bootsteps.StartStopStep):
    """Raises in ``start``, after the pool exists, as a broken custom step or a lost broker would."""

    requires = {"celery.worker.components:Pool"}

    def start(self, worker: Any) -> None:
        raise RuntimeError(MESSAGE)


@celeryd_init.connect(weak=False)
def add_failing_step(instance: Any, **_: Any) -> None:
    """Add the step to the worker being set up (dspex's app is not Celery's current app)."""
    instance.app.steps["worker"].add(FailsAtStart)
