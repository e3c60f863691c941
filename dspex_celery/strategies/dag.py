"""``dag``: each module is dispatched the moment its last dependency is done — no level barrier.

Readiness is decided in Redis by one Lua step per finished module: it marks the module done
(once: a repeated notification changes nothing), decrements each child's remaining-dependency
counter and returns the children that reached zero, how many modules are still open, and the
modules that block their children (failed, skipped, cancelled). Two parents finishing at once
therefore never double-dispatch or lose a child, and the module that closes the last open count
finishes the execution — no coordinator, no polling. On success the step runs in the same script
that stores the module's output and record: one round trip from "returned" to "children known".
"""

from __future__ import annotations

from typing import Any

from dspex_celery.canvas import module_signature
from dspex_celery.execution import BLOCKING, finish, skip
from dspex_celery.plan import Plan
from dspex_celery.results import ExecutionStatus, ModuleRecord, ModuleStatus
from dspex_celery.runtime import Runtime
from dspex_celery.state import LuaStep, lua_call
from dspex_celery.strategies import Strategy

# A LuaStep body — KEYS[k..k+3]: deps hash, done set, open counter, blocking hash.
# ARGV[a..]: ttl, module, its status if it blocks its children ('' otherwise), children...
# Returns {-1} when the module was already counted, else
# {open_left, #ready, ready..., blocking module, its status, ...} (blocking ones only with ready ones).
_COUNT_DONE = """
if redis.call('SADD', KEYS[k + 1], ARGV[a + 1]) == 0 then return {-1} end
if ARGV[a + 2] ~= '' then
  redis.call('HSET', KEYS[k + 3], ARGV[a + 1], ARGV[a + 2])
  redis.call('EXPIRE', KEYS[k + 3], ARGV[a])
end
local ready = {}
for i = a + 3, #ARGV do
  if redis.call('HINCRBY', KEYS[k], ARGV[i], -1) == 0 then table.insert(ready, ARGV[i]) end
end
local result = {redis.call('DECR', KEYS[k + 2]), #ready}
for _, name in ipairs(ready) do table.insert(result, name) end
if #ready > 0 then
  for _, item in ipairs(redis.call('HGETALL', KEYS[k + 3])) do table.insert(result, item) end
end
return result
"""
_COUNT_ALONE = "return " + lua_call(_COUNT_DONE, 1, 1)


class DagStrategy(Strategy):
    """Dependency-driven dispatch with atomic per-execution counters in the state store."""

    name = "dag"

    def start(self, runtime: Runtime, execution_id: str) -> None:
        plan = _plan(runtime, execution_id)
        records = {name: record for name, record in runtime.store.records(execution_id).items() if record.status.final}
        self._init_counters(runtime, execution_id, plan, records)
        if len(records) == len(plan.modules):
            finish(runtime, execution_id, ExecutionStatus.SUCCEEDED)
            return
        roots = [
            name
            for name, module in plan.modules.items()
            if name not in records and all(parent in records for parent in module.parents)
        ]
        blocking = {name: record.status.value for name, record in records.items() if record.status in BLOCKING}
        self._dispatch_ready(runtime, execution_id, plan, roots, blocking)

    def module_finished(self, runtime: Runtime, execution_id: str, module: str, status: ModuleStatus) -> None:
        if runtime.store.is_finished(execution_id):
            return
        plan = _plan(runtime, execution_id)
        step = self._count_step(runtime, execution_id, plan, module, status)
        self._go_on(runtime, execution_id, plan, runtime.store.script(_COUNT_ALONE)(keys=step.keys, args=step.args))

    def module_succeeded(self, runtime: Runtime, execution_id: str, module: str, output: dict[str, Any],
                         record: ModuleRecord) -> bool:
        plan = _plan(runtime, execution_id)
        step = self._count_step(runtime, execution_id, plan, module, ModuleStatus.SUCCEEDED)
        reply = runtime.store.save_success(execution_id, module, output, record, then=step)
        if reply is None:
            return False
        self._go_on(runtime, execution_id, plan, reply)
        return True

    # --- counters -------------------------------------------------------------------------------

    def _keys(self, runtime: Runtime, execution_id: str) -> list[str]:
        return [runtime.store.key(execution_id, part) for part in ("dag:deps", "dag:done", "dag:open", "dag:blocking")]

    def _init_counters(self, runtime: Runtime, execution_id: str, plan: Plan, records: dict[str, ModuleRecord]) -> None:
        deps_key, done_key, open_key, blocking_key = self._keys(runtime, execution_id)
        counts: dict[str | bytes, int] = {
            name: sum(parent not in records for parent in module.parents)
            for name, module in plan.modules.items()
        }
        blocking = {name: record.status.value for name, record in records.items() if record.status in BLOCKING}
        pipe = runtime.store.client.pipeline()
        pipe.hset(deps_key, mapping=counts)
        if records:
            pipe.sadd(done_key, *records)
        if blocking:
            pipe.hset(blocking_key, mapping=blocking)
        pipe.set(open_key, len(plan.modules) - len(records))
        for key in (deps_key, done_key, open_key, blocking_key):
            pipe.expire(key, runtime.store.ttl_s)
        pipe.execute()

    def _count_step(self, runtime: Runtime, execution_id: str, plan: Plan, module: str,
                    status: ModuleStatus) -> LuaStep:
        blocks = status.value if status in BLOCKING else ""
        args = [runtime.store.ttl_s, module, blocks, *plan.modules[module].children]
        return LuaStep(_COUNT_DONE, self._keys(runtime, execution_id), args)

    def _go_on(self, runtime: Runtime, execution_id: str, plan: Plan, reply: list[Any]) -> None:
        """Dispatch the children a count made ready; finish when nothing is left open."""
        left = int(reply[0])
        if left < 0:
            return  # this module was already counted (a repeated notification)
        count = int(reply[1])
        ready = [str(name) for name in reply[2:2 + count]]
        flat = [str(item) for item in reply[2 + count:]]
        self._dispatch_ready(runtime, execution_id, plan, ready, dict(zip(flat[::2], flat[1::2], strict=True)))
        if left == 0:
            finish(runtime, execution_id, ExecutionStatus.SUCCEEDED)

    # --- dispatch -------------------------------------------------------------------------------

    def _dispatch_ready(self, runtime: Runtime, execution_id: str, plan: Plan, ready: list[str],
                        blocking: dict[str, str]) -> None:
        """Send ready modules, most urgent (longest remaining path) first; skip blocked ones.

        Module results are not stored in the result backend: records and outputs live in the state store.
        """
        namespace = runtime.settings.namespace
        for name in sorted(ready, key=lambda n: (-plan.modules[n].priority, n)):
            parent = next((parent for parent in plan.modules[name].parents if parent in blocking), None)
            if parent is not None:
                skip(runtime, execution_id, name, parent, blocking[parent])
                self.module_finished(runtime, execution_id, name, ModuleStatus.SKIPPED)
                continue
            module_signature(runtime.app, plan, execution_id, name, namespace).apply_async(ignore_result=True)


def _plan(runtime: Runtime, execution_id: str) -> Plan:
    plan = runtime.store.plan(execution_id)
    if plan is None:
        raise LookupError(f"execution {execution_id} has no plan in the state store")
    return plan
