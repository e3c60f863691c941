"""Circuit breakers: one per program module, shared by every worker through Redis.

A circuit is keyed by program name and module name (``PROGRAM.MODULE``; the key is
``{namespace}:breaker:PROGRAM.MODULE``), so every execution of a program, on any worker, shares it.
After ``failures`` consecutive failed calls it *opens*: attempts fail at once with
:class:`~dspex_celery.errors.CircuitOpen` and the module is not called. ``reset_s`` after it
opened, one call is let through as a *trial* (half-open): its success closes the circuit, its
failure opens it for another ``reset_s``. The trial is a lease: released after the attempt
whatever happened, and expiring by itself if the worker process dies.

Only real calls count: attempts that fail before the module is called (not allowed, bad inputs,
open circuit), and calls that fail with an error of a class the policy's ``ignore`` names, neither
open nor close a circuit. Every transition is one Lua script, so two
workers never both take the trial.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dspex_celery.canvas import hard_time_limit
from dspex_celery.errors import CircuitOpen, UsageError, imported_exceptions
from dspex_celery.hooks import Hook, ModuleContext
from dspex_celery.plan import ModulePlan, Plan
from dspex_celery.rate_limits import is_rate_limit
from dspex_celery.settings import Settings
from dspex_celery.state import LuaStep, StateStore, lua_call

if TYPE_CHECKING:
    from dspex_celery.runtime import Runtime

#: How long a half-open trial of a module without ``timeout_s`` may run before another worker
#: may try (a trial whose worker was killed never reports back).
TRIAL_LEASE_S = 300.0

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# A LuaStep body — KEYS[k]: circuit. ARGV[a..a+3]: holder, reset_ms, trial_ms, failures threshold.
# Returns {verdict, number, holder}: {1, failures} closed (call); {2, 0} the trial (call);
# {0, ms} open, or half-open with the trial taken (do not call; ms until it may change).
_ACQUIRE_BODY = _NOW + """
local state = redis.call('HGET', KEYS[k], 'state')
if not state or state == 'closed' then
  return {1, tonumber(redis.call('HGET', KEYS[k], 'failures') or '0'), ARGV[a]}
end
local reopen = tonumber(redis.call('HGET', KEYS[k], 'opened_at') or '0') + tonumber(ARGV[a + 1])
if now < reopen then return {0, reopen - now, ARGV[a]} end
local trial_until = tonumber(redis.call('HGET', KEYS[k], 'trial_until') or '0')
if trial_until > now then return {0, trial_until - now, ARGV[a]} end
redis.call('HSET', KEYS[k], 'state', 'half_open', 'trial', ARGV[a], 'trial_until', now + tonumber(ARGV[a + 2]),
           'reset_ms', ARGV[a + 1], 'threshold', ARGV[a + 3])
return {2, 0, ARGV[a]}
"""
_ACQUIRE = "return " + lua_call(_ACQUIRE_BODY, 1, 1)

# KEYS: circuit. ARGV: holder, outcome (success | failure | release), failures threshold, reset_ms,
# ttl_ms (a circuit nobody fails for that long is forgotten: the key never outlives it).
_REPORT = _NOW + """
local is_trial = redis.call('HGET', KEYS[1], 'trial') == ARGV[1]
if ARGV[2] == 'release' then
  if is_trial then redis.call('HDEL', KEYS[1], 'trial', 'trial_until') end
  return 0
end
if ARGV[2] == 'success' then
  local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
  if is_trial or state == 'closed' then redis.call('DEL', KEYS[1]) end
  return 0
end
local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
if is_trial or (state == 'closed' and failures >= tonumber(ARGV[3])) then
  redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', now, 'reset_ms', ARGV[4], 'threshold', ARGV[3])
  redis.call('HDEL', KEYS[1], 'trial', 'trial_until')
else
  redis.call('HSETNX', KEYS[1], 'state', 'closed')
  redis.call('HSET', KEYS[1], 'threshold', ARGV[3], 'reset_ms', ARGV[4])
end
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return failures
"""


def circuit_name(program: str, module: str) -> str:
    """The name of a module's circuit, as ``dspex-celery breakers`` shows it."""
    return f"{program}.{module}"


def circuit_key(store: StateStore, name: str) -> str:
    return store.global_key(f"breaker:{name}")


class CircuitBreaker(Hook):
    """Fails attempts of a module fast while its circuit is open; counts its failed calls."""

    begin_step_portable = True  # the circuit, its policy and a fresh holder: all from the plan's module

    def begin_step(self, runtime: Runtime, plan: Plan, module: ModulePlan) -> LuaStep | None:
        """Take the circuit's verdict in the same round trip that starts a first attempt (on one Redis: on
        a Redis Cluster the circuit's key is in another slot than the execution's, so it is asked apart)."""
        if runtime.store.clustered:
            return None
        acquire = self._acquire(runtime.store, plan, module)
        return None if acquire is None else LuaStep(_ACQUIRE_BODY, *acquire)

    def before_module(self, ctx: ModuleContext) -> None:
        acquire = self._acquire(ctx.runtime.store, ctx.plan, ctx.module)
        if acquire is None:
            return
        keys, args = acquire
        reply = ctx.begun.get(self)
        if reply is None:  # a later attempt: ask now
            reply = ctx.runtime.store.script(_ACQUIRE)(keys=keys, args=args)
        verdict, number, holder = int(reply[0]), int(reply[1]), str(reply[2])
        policy, name = ctx.module.breaker_policy, circuit_name(ctx.plan.program, ctx.module.name)
        if verdict == 0:
            raise CircuitOpen(
                f"circuit '{name}' is open after {policy.failures} consecutive failures: not calling the "
                f"module; next trial in {number / 1000:.1f} s (or: dspex-celery breakers reset {name})"
            )
        ctx.extras["breaker"] = _Ticket(name, holder, trial=verdict == 2, clean=verdict == 1 and number == 0)

    def _acquire(self, store: StateStore, plan: Plan, module: ModulePlan) -> tuple[list[str], list[Any]] | None:
        """Keys and args of the acquire script for a module's attempt (a fresh holder: the script
        hands it back); None when its breaker is off."""
        policy = module.breaker_policy
        if not policy.enabled:
            return None
        trial_s = hard_time_limit(module.timeout_s) if module.timeout_s else TRIAL_LEASE_S
        key = circuit_key(store, circuit_name(plan.program, module.name))
        return [key], [uuid.uuid4().hex, int(policy.reset_s * 1000), int(trial_s * 1000), policy.failures]

    def after_success(self, ctx: ModuleContext, output: dict[str, Any]) -> None:
        ticket = ctx.extras.get("breaker")
        if ticket is not None and not ticket.clean:  # a closed circuit with no failures: nothing to reset
            self._report(ctx, ticket, "success")

    def after_failure(self, ctx: ModuleContext, error: BaseException, will_retry: bool) -> None:
        ticket = ctx.extras.get("breaker")
        if ticket is None:
            return
        # Terminated (the process is going away), rate-limited (the service is up; the resource limiter
        # backs off instead), or an error the policy ignores (the call's data, not its service): no verdict.
        ignored = imported_exceptions(ctx.module.breaker_policy.ignore or ())
        if not isinstance(error, Exception) or is_rate_limit(error) or isinstance(error, ignored):
            if ticket.trial:
                self._report(ctx, ticket, "release")
        elif ctx.extras.get("called"):
            self._report(ctx, ticket, "failure")

    def after_module(self, ctx: ModuleContext) -> None:
        # Runs before after_success (after after_failure): a call that was made gets its verdict
        # there; an attempt that never called the module hands the trial back.
        ticket = ctx.extras.get("breaker")
        if ticket is not None and ticket.trial and not ctx.extras.get("called"):
            self._report(ctx, ticket, "release")

    def _report(self, ctx: ModuleContext, ticket: _Ticket, outcome: str) -> None:
        ticket.trial = False  # a verdict (or a release) ends the trial
        policy = ctx.module.breaker_policy
        store = ctx.runtime.store
        reset_ms = int(policy.reset_s * 1000)
        args = [ticket.holder, outcome, policy.failures, reset_ms, circuit_ttl_ms(store.ttl_s, reset_ms)]
        store.script(_REPORT)(keys=[circuit_key(store, ticket.name)], args=args)


def circuit_ttl_ms(state_ttl_s: int, reset_ms: int) -> int:
    """How long a circuit's counts outlive its last failure: the state TTL, and at least two resets."""
    return max(state_ttl_s * 1000, 2 * reset_ms)


def breaker_hooks(settings: Settings) -> list[Hook]:
    """The breaker hook (every runtime has one; a module's ``breaker`` policy turns it on or off)."""
    return [CircuitBreaker()]


@dataclass
class _Ticket:
    name: str
    holder: str
    trial: bool
    clean: bool


# --- what `dspex-celery breakers` shows and resets ---------------------------------------------


def circuits(store: StateStore) -> list[dict[str, Any]]:
    """Every circuit with failures or not closed: name, state, failures, when it may close."""
    now_s, now_us = store.client.time()
    now_ms = int(now_s) * 1000 + int(now_us) // 1000
    prefix = circuit_key(store, "")
    found = []
    for key in sorted(store.client.scan_iter(match=prefix + "*", count=500)):
        data = store.client.hgetall(key)
        if data:
            found.append(_describe(key[len(prefix):], data, now_ms))
    return found


def _describe(name: str, data: dict[str, str], now_ms: int) -> dict[str, Any]:
    state = data.get("state", "closed")
    retry_in = None
    if state == "open":
        retry_in = max(0, int(data["opened_at"]) + int(data.get("reset_ms", 0)) - now_ms) / 1000
        state = "open" if retry_in > 0 else "half_open"  # the next attempt will be the trial
    return {
        "name": name,
        "state": state,
        "failures": int(data.get("failures", 0)),
        "threshold": int(data["threshold"]) if "threshold" in data else None,
        "trial_running": state == "half_open" and int(data.get("trial_until", 0)) > now_ms,
        "retry_in_s": retry_in,
    }


def reset_circuit(store: StateStore, name: str) -> None:
    """Close a circuit (forget its failures); an unknown name is a usage error."""
    if not store.client.delete(circuit_key(store, name)):
        raise UsageError(
            f"no circuit named '{name}' (it is closed, or never failed): "
            "run `dspex-celery breakers` to see the circuits, named PROGRAM.MODULE"
        )
