"""``dag``: each module is dispatched the moment its last dependency is done — no level barrier.

Readiness is decided in Redis by one Lua script per finished module: it marks the module done
(once: a repeated notification changes nothing), decrements each child's remaining-dependency
counter and returns the children that reached zero, plus how many modules are still open. Two
parents finishing at once therefore never double-dispatch or lose a child, and the module that
closes the last open count finishes the execution — no coordinator, no polling.
"""

from __future__ import annotations

from dspex_celery.canvas import module_signature
from dspex_celery.execution import blocked_by, finish, skip
from dspex_celery.plan import Plan
from dspex_celery.results import ExecutionStatus, ModuleStatus
from dspex_celery.runtime import Runtime
from dspex_celery.strategies import Strategy

# KEYS: deps hash, done set, open counter. ARGV: module, children...
# Returns {open_left, ready_child...}, or {-1} when the module was already counted.
_FINISH_MODULE = """
if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then return {-1} end
local result = {0}
for i = 2, #ARGV do
  if redis.call('HINCRBY', KEYS[1], ARGV[i], -1) == 0 then table.insert(result, ARGV[i]) end
end
result[1] = redis.call('DECR', KEYS[3])
return result
"""


class DagStrategy(Strategy):
    """Dependency-driven dispatch with atomic per-execution counters in the state store."""

    name = "dag"

    def start(self, runtime: Runtime, execution_id: str) -> None:
        plan = _plan(runtime, execution_id)
        done = {name for name, record in runtime.store.records(execution_id).items() if record.status.final}
        self._init_counters(runtime, execution_id, plan, done)
        if len(done) == len(plan.modules):
            finish(runtime, execution_id, ExecutionStatus.SUCCEEDED)
            return
        roots = [
            name
            for name, module in plan.modules.items()
            if name not in done and all(parent in done for parent in module.parents)
        ]
        self._dispatch_ready(runtime, execution_id, plan, roots)

    def module_finished(self, runtime: Runtime, execution_id: str, module: str, status: ModuleStatus) -> None:
        store = runtime.store
        if store.is_finished(execution_id):
            return
        plan = _plan(runtime, execution_id)
        left, ready = self._count_done(runtime, execution_id, plan, module)
        if left is None:
            return  # this module was already counted (a repeated notification)
        self._dispatch_ready(runtime, execution_id, plan, ready)
        if left == 0:
            finish(runtime, execution_id, ExecutionStatus.SUCCEEDED)

    # --- counters -------------------------------------------------------------------------------

    def _keys(self, runtime: Runtime, execution_id: str) -> list[str]:
        store = runtime.store
        return [store.key(execution_id, "dag:deps"), store.key(execution_id, "dag:done"),
                store.key(execution_id, "dag:open")]

    def _init_counters(self, runtime: Runtime, execution_id: str, plan: Plan, done: set[str]) -> None:
        deps_key, done_key, open_key = self._keys(runtime, execution_id)
        counts: dict[str | bytes, int] = {
            name: sum(parent not in done for parent in module.parents)
            for name, module in plan.modules.items()
        }
        pipe = runtime.store.client.pipeline()
        pipe.hset(deps_key, mapping=counts)
        if done:
            pipe.sadd(done_key, *done)
        pipe.set(open_key, len(plan.modules) - len(done))
        for key in (deps_key, done_key, open_key):
            pipe.expire(key, runtime.store.ttl_s)
        pipe.execute()

    def _count_done(
        self, runtime: Runtime, execution_id: str, plan: Plan, module: str
    ) -> tuple[int | None, list[str]]:
        script = runtime.store.client.register_script(_FINISH_MODULE)
        reply = script(keys=self._keys(runtime, execution_id), args=[module, *plan.modules[module].children])
        left = int(reply[0])
        if left < 0:
            return None, []
        return left, [str(name) for name in reply[1:]]

    # --- dispatch -------------------------------------------------------------------------------

    def _dispatch_ready(self, runtime: Runtime, execution_id: str, plan: Plan, ready: list[str]) -> None:
        """Send ready modules, most urgent (longest remaining path) first; skip blocked ones."""
        if not ready:
            return
        parents = [parent for name in ready for parent in plan.modules[name].parents]
        records = runtime.store.records_of(execution_id, parents)
        namespace = runtime.settings.namespace
        for name in sorted(ready, key=lambda n: (-plan.modules[n].priority, n)):
            parent = blocked_by(plan, name, records)
            if parent is not None:
                skip(runtime, execution_id, name, parent, records[parent].status.value)
                self.module_finished(runtime, execution_id, name, ModuleStatus.SKIPPED)
                continue
            module_signature(runtime.app, plan, execution_id, name, namespace).apply_async()


def _plan(runtime: Runtime, execution_id: str) -> Plan:
    plan = runtime.store.plan(execution_id)
    if plan is None:
        raise LookupError(f"execution {execution_id} has no plan in the state store")
    return plan
