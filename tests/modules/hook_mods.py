"""User hooks for tests/test_hooks.py, installed through the ``hooks`` setting (``DSPEX_HOOKS``)."""

from __future__ import annotations

import json
import os
from typing import Any

import redis

from dspex_celery.hooks import Hook, ModuleContext
from dspex_celery.results import ExecutionResult, ModuleRecord
from dspex_celery.settings import Settings
from tests.modules import suite_redis_url


def calls_key(namespace: str) -> str:
    """The Redis list a :class:`CallRecorder` of ``namespace`` appends its calls to."""
    return f"{namespace}:test-hook-calls"


class CallRecorder(Hook):
    """Appends ``[method, what, pid]`` to a Redis list for every hook call (any process, any pool)."""

    def __init__(self, settings: Settings) -> None:
        self.url = settings.state_url or suite_redis_url()
        self.key = calls_key(settings.namespace)
        self._client: redis.Redis | None = None
        self._pid = 0

    def before_module(self, ctx: ModuleContext) -> None:
        self._note("before_module", ctx.module.name)

    def after_success(self, ctx: ModuleContext, output: dict[str, Any]) -> None:
        self._note("after_success", ctx.module.name)

    def after_failure(self, ctx: ModuleContext, error: BaseException, will_retry: bool) -> None:
        self._note("after_failure", ctx.module.name)

    def after_module(self, ctx: ModuleContext) -> None:
        self._note("after_module", ctx.module.name)

    def on_record(self, execution_id: str, module: str, record: ModuleRecord) -> None:
        self._note("on_record", f"{module}:{record.status.value}")

    def on_execution_finished(self, result: ExecutionResult) -> None:
        self._note("on_execution_finished", result.status.value)

    def _note(self, method: str, what: str) -> None:
        if self._client is None or self._pid != os.getpid():  # a forked pool process: its own connection
            self._client, self._pid = redis.Redis.from_url(self.url, decode_responses=True), os.getpid()
        self._client.rpush(self.key, json.dumps([method, what, self._pid]))


def not_a_hook(settings: Settings) -> object:
    """A factory that returns something else than a hook."""
    return {"namespace": settings.namespace}
