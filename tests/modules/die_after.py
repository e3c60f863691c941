"""Loaded with ``worker --include tests.modules.die_after``: the worker process dies (``os._exit``:
no cleanup, no ack) right after the module named by ``DSPEX_TEST_DIE_AFTER`` has stored its success —
when it publishes a child's task message, or when its task returns, whichever comes first — or, with
``DSPEX_TEST_DIE_IN_FINISH`` set, once it has claimed to finish an execution, before publishing it."""

from __future__ import annotations

import os
from typing import Any

from celery import current_task, signals

MODULE = os.environ.get("DSPEX_TEST_DIE_AFTER", "")


def _running(args: Any) -> bool:
    return bool(args) and len(args) > 1 and args[1] == MODULE


@signals.before_task_publish.connect(weak=False)
def _die_while_dispatching(**_: Any) -> None:
    if current_task is not None and _running(current_task.request.args):
        os._exit(1)


@signals.task_postrun.connect(weak=False)
def _die_after_returning(args: tuple[Any, ...] | None = None, **_: Any) -> None:
    if _running(args):
        os._exit(1)


if os.environ.get("DSPEX_TEST_DIE_IN_FINISH"):
    from dspex_celery.execution import Execution

    def _die_while_publishing(*_: Any, **__: Any) -> Any:
        os._exit(1)

    Execution.result = _die_while_publishing  # type: ignore[method-assign]  # after the finish claim, before publishing
