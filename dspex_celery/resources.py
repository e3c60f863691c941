"""Cluster-wide resource limits: a concurrency cap and a rate per resource class, in Redis.

Config (``resources:`` in the config file, or ``DSPEX_RESOURCES`` as JSON)::

    resources:
      llm: {max_concurrent: 8, rate: "60/m"}

Every module of a limited class takes a *lease* before it runs and gives it back after its
record is written. Leases expire unless their holder renews them (a background thread of each
worker process does, every third of ``lease_ttl_s``), so the slot of a killed worker comes back
after at most ``lease_ttl_s``. A module waiting for a slot blocks its worker slot (it is not an
error and not an attempt); its record then says ``waiting_for`` while it waits, and ``waited_s``
with ``started_at`` set to when it got the slot. The wait counts towards the module's
``timeout_s`` (Celery's time limits start when the task does).

**429-adaptive limits.** When a module of a class fails with a rate-limit error (an LM's
``RateLimitError``, HTTP 429; see :mod:`dspex_celery.rate_limits`), the class's cluster-wide limit
backs off, AIMD: it is halved (at most once per :data:`COOLDOWN_S` or Retry-After, whichever is
longer: errors of one burst are one event), then grows by 1 per ``recover_every_s`` without a 429,
back up to ``max_concurrent``, where the adaptive state ends. A Retry-After also pauses the class's
new starts until it has passed (and the retry's countdown is at least that long). A class without
``max_concurrent`` is not limited until its first 429; its cap is then the pool slots of the live
workers serving it (their presence entries; else the modules of the class the reporting process was
running), it starts at half that and climbs back, where the class is unlimited again. ``adaptive: false`` turns this off for a class.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
)

from dspex_celery.errors import ConfigError, ResourceWaitAborted
from dspex_celery.hooks import Hook, ModuleContext
from dspex_celery.rate_limits import is_rate_limit, retry_after_s
from dspex_celery.results import isoformat, utcnow
from dspex_celery.settings import Settings
from dspex_celery.state import StateStore

log = logging.getLogger(__name__)

#: Lease lifetime: how long the slot of a killed worker stays taken. Renewed every third of it.
LEASE_TTL_S = 30.0
#: Longest pause between two tries for a slot; a release wakes one waiter at once.
MAX_POLL_S = 1.0
#: Wake-up tokens kept for waiters that have not yet blocked (a stale one costs one extra try).
WAKE_TOKENS = 32
#: Quiet seconds (no 429) after which an adaptive limit grows by one slot.
RECOVER_EVERY_S = 10.0
#: Rate-limit errors within this many seconds of a halving (or its Retry-After) are the same burst.
COOLDOWN_S = 1.0
#: How long a process trusts its last look at whether an unconfigured class has an adaptive limit.
ADAPTIVE_CHECK_S = 1.0
#: A worker's presence entry older than this no longer counts its slots (presence.STALE_AFTER_S).
WORKER_STALE_S = 30.0
#: Seconds per rate unit.
RATE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_RATE = re.compile(r"^\s*(\d+)\s*/\s*([smh])\s*$")

# Returns 0 (acquired), -1 (no free slot) or the milliseconds until the rate allows a start.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
if #dead > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  redis.call('HDEL', KEYS[2], unpack(dead))
end
local max = tonumber(ARGV[2])
if ARGV[7] == '1' and redis.call('EXISTS', KEYS[4]) == 1 then
  local a = redis.call('HMGET', KEYS[4], 'limit', 'cap', 'since', 'until')
  local limit, cap, since = tonumber(a[1]), tonumber(a[2]), tonumber(a[3])
  local every = tonumber(ARGV[8])
  local steps = math.floor((now - since) / every)
  if steps > 0 then
    limit = math.min(cap, limit + steps)
    redis.call('HSET', KEYS[4], 'limit', limit, 'since', since + steps * every)
  end
  local pause = tonumber(a[4] or '0') - now
  if pause > 0 then return pause end
  if limit >= cap then
    redis.call('DEL', KEYS[4])
  elseif max == 0 or limit < max then
    max = limit
  end
end
if max > 0 and redis.call('ZCARD', KEYS[1]) >= max then return -1 end
local rate_n = tonumber(ARGV[4])
if rate_n > 0 then
  local window = tonumber(ARGV[5])
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - window)
  if redis.call('ZCARD', KEYS[3]) >= rate_n then
    local oldest = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
    return math.max(1, tonumber(oldest[2]) + window - now)
  end
  redis.call('ZADD', KEYS[3], now, ARGV[1])
  redis.call('PEXPIRE', KEYS[3], window)
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[6])
return 0
"""

# Pushes the expiry of a live lease; returns 0 when the lease is gone (expired and reclaimed).
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expiry = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not expiry or tonumber(expiry) < now then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return 1
"""


# KEYS: the class's adaptive state (hash). ARGV: cap, Retry-After ms (0: none), cooldown ms, recover ms.
# Halves the limit (starting from the cap) unless it was halved within the cooldown; a Retry-After
# pauses new starts until it has passed. Returns the limit.
_BACK_OFF = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local a = redis.call('HMGET', KEYS[1], 'limit', 'cut_at', 'until', 'halvings', 'cap')
local cap = tonumber(a[5] or ARGV[1])
local limit = tonumber(a[1] or cap)
local pause = tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'cap', cap, 'last_429', now, 'since', now, 'rate_limited',
           1 + tonumber(redis.call('HGET', KEYS[1], 'rate_limited') or '0'))
if pause > 0 then
  redis.call('HSET', KEYS[1], 'until', math.max(tonumber(a[3] or '0'), now + pause), 'retry_after_ms', pause)
end
if not a[2] or now - tonumber(a[2]) >= math.max(tonumber(ARGV[3]), pause) then
  limit = math.max(1, math.floor(limit / 2))
  redis.call('HSET', KEYS[1], 'limit', limit, 'cut_at', now, 'halvings', 1 + tonumber(a[4] or '0'))
end
redis.call('PEXPIRE', KEYS[1], (cap - limit + 1) * tonumber(ARGV[4]) + pause + 60000)
return limit
"""


class ResourceLimit(BaseModel):
    """Limits of one resource class, the same on every worker."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_concurrent: int | None = Field(default=None, ge=1, description="Modules running at once, cluster-wide.")
    rate: str | None = Field(default=None, description='Starts per unit, e.g. "60/m" (units s, m, h).')
    lease_ttl_s: float = Field(default=LEASE_TTL_S, gt=0, description="Lease lifetime without renewal.")
    adaptive: bool = Field(default=True, description="Halve the limit on a 429; +1 per quiet interval.")
    recover_every_s: float = Field(default=RECOVER_EVERY_S, gt=0, description="Quiet seconds per +1 slot.")

    @field_validator("rate")
    @classmethod
    def _check_rate(cls, value: str | None) -> str | None:
        if value is not None and not _RATE.match(value):
            raise ValueError(f"rate '{value}' is not COUNT/UNIT with UNIT s, m or h (e.g. \"60/m\")")
        return value

    @property
    def rate_window(self) -> tuple[int, float]:
        """(starts allowed, window in seconds); (0, 0) without a rate."""
        match = _RATE.match(self.rate or "")
        return (int(match[1]), RATE_UNITS[match[2]]) if match else (0, 0.0)


_LIMITS = TypeAdapter(dict[str, ResourceLimit])


def parse_limits(raw: Mapping[str, Any]) -> dict[str, ResourceLimit]:
    """Validated limits from ``Settings.resources``; one clear line when they are invalid."""
    try:
        return _LIMITS.validate_python(dict(raw))
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        raise ConfigError(
            f"resources.{where}: {error['msg']}: fix `resources:` in the config file or DSPEX_RESOURCES"
        ) from None


def lease_keys(store: StateStore, resource: str) -> tuple[str, str, str]:
    """Redis keys of a class: leases (zset holder -> expiry ms), holders (hash), starts (zset)."""
    base = class_key(store, resource)
    return f"{base}:leases", f"{base}:holders", f"{base}:starts"


def class_key(store: StateStore, resource: str) -> str:
    """``{ns}:res:{CLASS}``, the start of a class's keys: the hash tag ``{CLASS}`` keeps them in one
    Redis Cluster slot, so one script may touch them all."""
    return store.global_key(f"res:{{{resource}}}")


def adaptive_key(store: StateStore, resource: str) -> str:
    """The class's adaptive limit (hash: limit, cap, halvings, since, until, ...); absent at its cap."""
    return f"{class_key(store, resource)}:adaptive"


def wake_key(store: StateStore, resource: str) -> str:
    """A list a release pushes a token to; a waiter blocks on it (BLPOP) between tries."""
    return f"{class_key(store, resource)}:wake"


# --- leases ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lease:
    resource: str
    holder: str
    ttl_s: float


class LeaseKeeper:
    """Lease scripts of one store, and a thread per process that renews the leases it holds."""

    def __init__(self, store: StateStore) -> None:
        self.store = store
        self.leases: dict[str, Lease] = {}
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.thread: threading.Thread | None = None
        self.pid = 0
        self.renew = store.script(_RENEW)
        self.acquire = store.script(_ACQUIRE)

    def track(self, lease: Lease) -> None:
        with self.lock:
            self.leases[lease.holder] = lease
            if self.thread is None or self.pid != os.getpid() or not self.thread.is_alive():
                self.pid = os.getpid()  # a forked pool process starts its own thread
                self.thread = threading.Thread(target=self._loop, name="dspex-lease-keeper", daemon=True)
                self.thread.start()
        self.wake.set()

    def untrack(self, holder: str) -> None:
        with self.lock:
            self.leases.pop(holder, None)

    def _loop(self) -> None:
        while True:
            with self.lock:
                leases = list(self.leases.values())
            interval = min((lease.ttl_s for lease in leases), default=LEASE_TTL_S) / 3
            self.wake.wait(interval)
            self.wake.clear()
            for lease in leases:
                self._renew(lease)

    def _renew(self, lease: Lease) -> None:
        with self.lock:
            if lease.holder not in self.leases:
                return
        leases_key = lease_keys(self.store, lease.resource)[0]
        try:
            alive = self.renew(keys=[leases_key], args=[lease.holder, int(lease.ttl_s * 1000)])
        except Exception:  # Redis hiccup: the next round tries again, before the lease expires
            log.warning("could not renew the %s lease %s", lease.resource, lease.holder, exc_info=True)
            return
        if not alive:
            log.warning("the %s lease %s expired before it was renewed", lease.resource, lease.holder)
            self.untrack(lease.holder)


# --- the hook --------------------------------------------------------------------------------


class ResourceLimiter(Hook):
    """Takes a lease of the module's resource class before it runs; gives it back after. A
    rate-limit error backs the class's limit off (see the module's docstring)."""

    def __init__(self, limits: Mapping[str, ResourceLimit]) -> None:
        self.limits = dict(limits)
        self._keepers: dict[int, LeaseKeeper] = {}
        self._lock = threading.Lock()
        self._running: Counter[str] = Counter()  # modules of each class running in this process
        self._adaptive_seen: dict[tuple[int, str], tuple[float, bool]] = {}  # (store, class) -> (until, has one)

    def keeper(self, store: StateStore) -> LeaseKeeper:
        """The lease keeper of ``store`` (one per runtime)."""
        with self._lock:
            if id(store) not in self._keepers:
                self._keepers[id(store)] = LeaseKeeper(store)
            return self._keepers[id(store)]

    def limit_of(self, store: StateStore, resource: str) -> ResourceLimit | None:
        """The class's configured limit; for an unconfigured class, a default one while it has an
        adaptive limit (after a 429), else None (not limited)."""
        configured = self.limits.get(resource)
        if configured is not None:
            return configured
        key = (id(store), resource)
        until, has_one = self._adaptive_seen.get(key, (0.0, False))
        if time.monotonic() >= until:
            has_one = bool(store.client.exists(adaptive_key(store, resource)))
            self._adaptive_seen[key] = (time.monotonic() + ADAPTIVE_CHECK_S, has_one)
        return ResourceLimit() if has_one else None

    def before_module(self, ctx: ModuleContext) -> None:
        with self._lock:
            self._running[ctx.module.resource] += 1
        ctx.extras["resource_counted"] = True
        limit = self.limit_of(ctx.runtime.store, ctx.module.resource)
        if limit is None:
            return
        lease = Lease(ctx.module.resource, uuid.uuid4().hex, limit.lease_ttl_s)
        waited = self._wait_for_slot(ctx, lease, limit)
        ctx.extras["resource_lease"] = lease
        self.keeper(ctx.runtime.store).track(lease)
        got_it = utcnow()
        ctx.record.waited_s = round((got_it - ctx.started_at).total_seconds(), 6)
        ctx.record.waiting_for = None
        ctx.record.started_at = isoformat(got_it)
        ctx.started_at = got_it  # the module's duration starts now; the wait is in waited_s
        if waited:
            ctx.write_record()

    def after_module(self, ctx: ModuleContext) -> None:
        # On success the record is written after this: stop renewing, release in after_success
        # (if that never comes, the lease expires).
        lease = ctx.extras.get("resource_lease")
        if lease is not None:
            self.keeper(ctx.runtime.store).untrack(lease.holder)
        if ctx.extras.pop("resource_counted", False):
            with self._lock:
                self._running[ctx.module.resource] -= 1

    def after_success(self, ctx: ModuleContext, output: dict[str, Any]) -> None:
        self._release(ctx)

    def after_failure(self, ctx: ModuleContext, error: BaseException, will_retry: bool) -> None:
        self._release(ctx)
        if is_rate_limit(error):
            self.back_off(ctx, retry_after_s(error))

    def back_off(self, ctx: ModuleContext, retry_after: float | None) -> int | None:
        """Halve the class's cluster-wide limit after a 429 (and pause it for ``retry_after``);
        the new limit, or None when the class is not adaptive."""
        store, resource = ctx.runtime.store, ctx.module.resource
        limit = self.limits.get(resource) or ResourceLimit()
        if not limit.adaptive:
            return None
        with self._lock:
            running_here = self._running[resource]
        cap = limit.max_concurrent or slots_serving(store, resource) or max(1, running_here)
        script = store.script(_BACK_OFF)
        args = [cap, int((retry_after or 0) * 1000), int(COOLDOWN_S * 1000), int(limit.recover_every_s * 1000)]
        new_limit = int(script(keys=[adaptive_key(store, resource)], args=args))
        self._adaptive_seen[(id(store), resource)] = (time.monotonic() + ADAPTIVE_CHECK_S, True)
        log.warning("%s: rate-limited (429) in %s.%s; its limit is now %d of %d",
                    resource, ctx.execution_id, ctx.module.name, new_limit, cap)
        return new_limit

    def _wait_for_slot(self, ctx: ModuleContext, lease: Lease, limit: ResourceLimit) -> bool:
        """Block until the lease is taken; True when it had to wait."""
        store = ctx.runtime.store
        keeper = self.keeper(store)
        keys = [*lease_keys(store, lease.resource), adaptive_key(store, lease.resource)]
        rate_n, window_s = limit.rate_window
        info = json.dumps({"execution_id": ctx.execution_id, "module": ctx.module.name, "attempt": ctx.attempt,
                           "worker": ctx.worker, "pid": os.getpid(), "since": isoformat(utcnow())})
        args = [lease.holder, limit.max_concurrent or 0, int(lease.ttl_s * 1000), rate_n, int(window_s * 1000), info,
                int(limit.adaptive), int(limit.recover_every_s * 1000)]
        pause = 0.05
        for tries in itertools.count():
            hint = int(keeper.acquire(keys=keys, args=args))
            if hint == 0:
                return tries > 0
            if tries == 0:
                ctx.record.waiting_for = lease.resource
                ctx.write_record()
            elif store.is_finished(ctx.execution_id):
                raise ResourceWaitAborted(
                    f"module '{ctx.module.name}': the execution ended while it waited for a '{lease.resource}' slot"
                )
            pause = min(pause * 1.5, MAX_POLL_S)
            if hint > 0:  # the rate allows the next start in `hint` ms
                time.sleep(hint / 1000 * random.uniform(1.0, 1.1))
            else:
                store.client.blpop([wake_key(store, lease.resource)], timeout=pause * random.uniform(0.5, 1.0))
        raise AssertionError("unreachable")  # pragma: no cover

    def _release(self, ctx: ModuleContext) -> None:
        lease = ctx.extras.pop("resource_lease", None)
        if lease is None:
            return
        store = ctx.runtime.store
        self.keeper(store).untrack(lease.holder)
        leases_key, holders_key, _ = lease_keys(store, lease.resource)
        pipe = store.client.pipeline()
        pipe.zrem(leases_key, lease.holder)
        pipe.hdel(holders_key, lease.holder)
        wake = wake_key(store, lease.resource)
        pipe.rpush(wake, "1")
        pipe.ltrim(wake, -WAKE_TOKENS, -1)
        pipe.expire(wake, 60)
        pipe.execute()


def slots_serving(store: StateStore, resource: str) -> int:
    """Pool slots of the live workers that serve ``resource``, from their presence entries in
    ``{ns}:workers`` (see :mod:`dspex_celery.presence`); 0 when none says."""
    now = time.time()
    entries = [json.loads(raw) for raw in store.client.hvals(store.global_key("workers"))]
    return sum(int(entry.get("slots") or 0) for entry in entries
               if resource in entry.get("resources", ()) and now - float(entry.get("seen", 0)) < WORKER_STALE_S)


def limiter_hooks(settings: Settings) -> list[Hook]:
    """The limiter hook (validating ``resources:``): always, since any class may get a 429."""
    return [ResourceLimiter(parse_limits(settings.resources))]


# --- what `dspex-celery resources` shows -------------------------------------------------------


def snapshot(store: StateStore, limits: Mapping[str, ResourceLimit]) -> list[dict[str, Any]]:
    """Per class (configured here, or holding leases in Redis): limits, holders, utilization."""
    seconds, micros = store.client.time()
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    return [_class_snapshot(store, name, limits.get(name), now_ms) for name in sorted({*limits, *_seen(store)})]


def _seen(store: StateStore) -> set[str]:
    prefix = store.global_key("res:")
    keys = store.client.scan_iter(match=f"{prefix}*", count=500)
    return {key[len(prefix) :].rsplit(":", 1)[0].strip("{}") for key in keys if key.endswith((":leases", ":adaptive"))}


def _class_snapshot(store: StateStore, name: str, limit: ResourceLimit | None, now_ms: int) -> dict[str, Any]:
    leases_key, holders_key, starts_key = lease_keys(store, name)
    expiries = dict(store.client.zrangebyscore(leases_key, now_ms, "+inf", withscores=True))
    infos = store.client.hmget(holders_key, list(expiries)) if expiries else []
    holders = [
        {**json.loads(info or "{}"), "lease": holder, "expires_in_s": round((expiry - now_ms) / 1000, 3)}
        for (holder, expiry), info in zip(expiries.items(), infos, strict=True)
    ]
    configured = limit is not None
    limit = limit or ResourceLimit()
    rate_n, window_s = limit.rate_window
    starts = store.client.zcount(starts_key, now_ms - window_s * 1000, "+inf") if rate_n else None
    return {
        "resource": name,
        "configured": configured,
        "max_concurrent": limit.max_concurrent,
        "rate": limit.rate,
        "lease_ttl_s": limit.lease_ttl_s,
        "in_use": len(holders),
        "utilization": round(len(holders) / limit.max_concurrent, 3) if limit.max_concurrent else None,
        "starts_in_window": starts,
        "holders": sorted(holders, key=lambda holder: holder.get("since", "")),
        "adaptive": adaptive_state(store.client.hgetall(adaptive_key(store, name)), limit, now_ms),
    }


def adaptive_state(raw: Mapping[str, str], limit: ResourceLimit, now_ms: int) -> dict[str, Any] | None:
    """The class's adaptive limit as of ``now_ms`` (the growth the next acquire would apply included),
    and why it is there; None when the class runs at its configured limit."""
    if not raw or "limit" not in raw:
        return None
    cap, every_ms = int(raw["cap"]), limit.recover_every_s * 1000
    current = min(cap, int(raw["limit"]) + int((now_ms - int(raw["since"])) // every_ms))
    if current >= cap:
        return None
    halvings, every_s = int(raw.get("halvings", 0)), limit.recover_every_s
    return {
        "limit": current,
        "cap": cap,
        "halvings": halvings,
        "rate_limited": int(raw.get("rate_limited", 0)),
        "last_429_ago_s": round((now_ms - int(raw["last_429"])) / 1000, 3),
        "paused_for_s": round(max(0, int(raw.get("until", 0)) - now_ms) / 1000, 3),
        "recover_every_s": every_s,
        "reason": f"halved {halvings}\u00d7 after 429, +1 per {every_s:g} s quiet",
    }
