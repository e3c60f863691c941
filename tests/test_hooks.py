"""User hooks: added through create_runtime(hooks=...) or runtime.hooks.add in-process, and through
the ``hooks`` setting (DSPEX_HOOKS) on real `dspex-celery worker` processes; allow-listed like modules."""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import pytest
import redis

from dspex_celery import ExecutionStatus, Settings, create_runtime, submit_program
from dspex_celery.bootstrap import default_hooks
from dspex_celery.breaker import CircuitBreaker
from dspex_celery.errors import ConfigError
from dspex_celery.hooks import Hook, ModuleContext
from dspex_celery.results import ExecutionResult, ModuleRecord
from dspex_celery.tracing import TracingHook
from tests.conftest import Cluster, program, wait_for
from tests.modules.hook_mods import CallRecorder, calls_key

RECORDER = "tests.modules.hook_mods:CallRecorder"

#: One module that succeeds, then one that fails (ValueError: no retry), so the execution fails.
SUCCEEDS_THEN_FAILS = program("hooked", {
    "first": {"uses": "tests.modules.basic:add", "inputs": {"a": 1, "b": 2}},
    "second": {"uses": "tests.modules.basic:fail", "inputs": {"message": "boom", "after": "$first.sum"}},
})
#: What a hook sees of each module, in order.
SUCCESS_CALLS = ["before_module", "after_module", "after_success"]
FAILURE_CALLS = ["before_module", "after_failure", "after_module"]


class ListRecorder(Hook):
    """Keeps ``(method, what)`` of every call in a list (an in-process hook)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def before_module(self, ctx: ModuleContext) -> None:
        self.calls.append(("before_module", ctx.module.name))

    def after_success(self, ctx: ModuleContext, output: dict[str, Any]) -> None:
        self.calls.append(("after_success", ctx.module.name))

    def after_failure(self, ctx: ModuleContext, error: BaseException, will_retry: bool) -> None:
        self.calls.append(("after_failure", ctx.module.name))

    def after_module(self, ctx: ModuleContext) -> None:
        self.calls.append(("after_module", ctx.module.name))

    def on_record(self, execution_id: str, module: str, record: ModuleRecord) -> None:
        self.calls.append(("on_record", f"{module}:{record.status.value}"))

    def on_execution_finished(self, result: ExecutionResult) -> None:
        self.calls.append(("on_execution_finished", result.status.value))


def module_calls(calls: list[tuple[str, str]], module: str) -> list[str]:
    """The module-level hook methods called for ``module``, in order."""
    return [method for method, what in calls if what == module]


def assert_saw_the_run(calls: list[tuple[str, str]]) -> None:
    assert module_calls(calls, "first") == SUCCESS_CALLS
    assert module_calls(calls, "second") == FAILURE_CALLS
    records = [what for method, what in calls if method == "on_record"]
    assert {"first:running", "first:succeeded", "second:running", "second:failed"} <= set(records)
    assert [what for method, what in calls if method == "on_execution_finished"] == ["failed"]


def embedded_settings(**extra: Any) -> Settings:
    return Settings(namespace=f"hooks-{uuid.uuid4().hex[:8]}", **extra)


def test_a_hook_passed_to_create_runtime_sees_every_call_next_to_the_defaults() -> None:
    # Given an embedded runtime with the default hooks and one of ours
    settings = embedded_settings()
    recorder = ListRecorder()
    runtime = create_runtime(settings, hooks=[*default_hooks(settings), recorder])
    # When a program whose second module fails runs
    result = submit_program(SUCCEEDS_THEN_FAILS, {}, app=runtime.app).get(timeout=60, propagate=False)
    # Then our hook saw each module's attempt, its records and the end; the defaults are still first
    assert result.status is ExecutionStatus.FAILED
    wait_for(lambda: ("on_execution_finished", "failed") in recorder.calls, 10, "on_execution_finished")
    assert_saw_the_run(recorder.calls)
    first, second = runtime.hooks.hooks[:2]  # tracing first (its span covers the breaker), then the breaker
    assert isinstance(first, TracingHook) and isinstance(second, CircuitBreaker) and runtime.hooks.hooks[-1] is recorder


def test_a_list_of_hooks_is_exactly_the_runtime_hooks_and_add_extends_them() -> None:
    settings = embedded_settings(hooks=(RECORDER,))  # replaced, like the defaults
    only, added = ListRecorder(), ListRecorder()
    runtime = create_runtime(settings, hooks=[only])
    runtime.hooks.add(added)
    assert runtime.hooks.hooks == [only, added]
    result = submit_program(SUCCEEDS_THEN_FAILS, {}, app=runtime.app).get(timeout=60, propagate=False)
    assert result.status is ExecutionStatus.FAILED
    wait_for(lambda: ("on_execution_finished", "failed") in added.calls, 10, "on_execution_finished")
    assert only.calls == added.calls
    assert_saw_the_run(added.calls)


def test_the_hooks_setting_adds_hooks_after_the_defaults() -> None:
    # An embedded runtime without an allow-list trusts the hook's own package, as it trusts programs
    settings = embedded_settings(hooks=(RECORDER,))
    hooks = default_hooks(settings)
    assert isinstance(hooks[0], TracingHook) and isinstance(hooks[1], CircuitBreaker)
    assert isinstance(hooks[-1], CallRecorder)
    assert sum(isinstance(hook, CallRecorder) for hook in hooks) == 1


def test_dspex_hooks_is_a_comma_separated_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSPEX_HOOKS", f"{RECORDER}, tests.modules.hook_mods:Other")
    assert Settings().hooks == (RECORDER, "tests.modules.hook_mods:Other")


@pytest.mark.parametrize(
    ("hook", "broker", "message"),
    [
        ("json:dumps", "redis://127.0.0.1:6379/3",
         "hook 'json:dumps' is refused ('json' is outside the allowed packages ('tests.modules')): "
         "add --modules json (or DSPEX_MODULES) if you trust that module"),
        ("tests.modules.hook_mods:json.dumps", "redis://127.0.0.1:6379/3",
         "hook 'tests.modules.hook_mods:json.dumps' is refused (it passes through the module 'json'"),
        ("tests.modules.hook_mods:redis", None, "hook 'tests.modules.hook_mods:redis' is refused (it passes through"),
        ("tests.modules.hook_mods", None, "hook 'tests.modules.hook_mods' is not package.module:factory"),
        ("tests.modules.hook_mods:Missing", None,
         "cannot load hook 'tests.modules.hook_mods:Missing' ('tests.modules.hook_mods' has no attribute 'Missing')"),
        ("tests.modules.hook_mods:not_a_hook", None,
         "hook 'tests.modules.hook_mods:not_a_hook' returned dict, not a Hook"),
    ],
    ids=["outside-allow-list", "through-a-module", "embedded-through-a-module", "no-colon", "missing", "not-a-hook"],
)
def test_a_hook_that_cannot_be_installed_is_one_line(hook: str, broker: str | None, message: str) -> None:
    modules = "tests.modules" if broker else ""
    settings = Settings(broker_url=broker, namespace="hooks-refused", modules=modules, hooks=(hook,))
    with pytest.raises(ConfigError) as caught:
        default_hooks(settings)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


@pytest.fixture(scope="module")
def cluster(make_cluster: Any) -> Cluster:
    return make_cluster()


def worker_calls(cluster: Cluster) -> list[tuple[str, str, int]]:
    client = redis.Redis.from_url(cluster.settings.state_url or "", decode_responses=True)
    return [tuple(json.loads(item)) for item in client.lrange(calls_key(cluster.settings.namespace), 0, -1)]


def test_a_worker_installs_the_hooks_of_its_settings(cluster: Cluster) -> None:
    # Given a prefork worker started with DSPEX_HOOKS naming an allow-listed hook factory
    worker = cluster.start_worker("default", concurrency=2, pool="prefork", env={"DSPEX_HOOKS": RECORDER})
    # When a program runs on it (this client installs no such hook)
    result = cluster.run(SUCCEEDS_THEN_FAILS)
    # Then the worker's pool processes called the hook for each module and for the end
    assert result.status is ExecutionStatus.FAILED
    wait_for(lambda: any(call[0] == "on_execution_finished" for call in worker_calls(cluster)), 20,
             "on_execution_finished on the worker")
    calls = worker_calls(cluster)
    assert_saw_the_run([(method, what) for method, what, _ in calls])
    assert {pid for _, _, pid in calls} <= set(worker.pool_pids()) and os.getpid() not in {pid for *_, pid in calls}


def test_a_worker_refuses_a_hook_outside_the_allow_list(cluster: Cluster) -> None:
    done = cluster.cli("worker", "--resource", "default", env={"DSPEX_HOOKS": "json:dumps"}, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: hook 'json:dumps' is refused ('json' is outside the allowed packages ('tests.modules', "
        "'dspex_celery.examples')): add --modules json (or DSPEX_MODULES) if you trust that module"
    ]
