"""The shared LM cache and the LM meter of one module call (worker side of the DSPy integration).

``RedisLMCache`` is a ``dspy.clients.Cache`` whose entries live in the state store's Redis under the
execution-independent namespace (``{ns}:{lm-cache}:e:<DSPy's cache_key>``), so an LM request made
on any worker is answered from it everywhere else. Entries are JSON (DSPy's plain-data result
record, or a pydantic response such as litellm's ``ModelResponse`` as its ``model_dump``), never
pickles; each expires after ``lm_cache_ttl_s``, and a sorted set of keys by last use keeps at most
``lm_cache_max_entries`` (the least recently used are deleted when a write goes over: a shared
Redis's ``maxmemory`` is not ours to set). ``install_lm_cache`` puts it in ``dspy.cache`` once per
process when the ``lm_cache`` setting is ``redis``.

``LMMeter`` collects what one module call's LM requests used: DSPy's usage tracker (tokens), the LM
history entries (cost, as DSPy priced them) and the cache's hits and misses.
"""

from __future__ import annotations

import functools
import importlib
import logging
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

import orjson
import redis

from dspex_celery.usage import Usage

if TYPE_CHECKING:
    from dspex_celery.runtime import Runtime
    from dspex_celery.state import StateStore

log = logging.getLogger(__name__)

#: The ``dspy.settings`` key under which a module call's meter is found (``dspy.context`` carries it
#: into the threads of ``dspy.Parallel``).
METER_SETTING = "dspex_lm_meter"

#: Hash tag of every cache key: one Redis Cluster slot, so a write and its evictions are one script.
TAG = "{lm-cache}"

#: Pydantic response classes an entry may name, by module prefix (litellm's responses).
DECODABLE_PREFIXES = ("litellm.",)

# KEYS[1] entry, KEYS[2] keys by last use; ARGV value, ttl_s, now, max_entries. Returns evictions.
_PUT = """
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], KEYS[1])
redis.call('EXPIRE', KEYS[2], ARGV[2])
local over = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[4])
if over <= 0 then return 0 end
local oldest = redis.call('ZRANGE', KEYS[2], 0, over - 1)
redis.call('ZREMRANGEBYRANK', KEYS[2], 0, over - 1)
for _, key in ipairs(oldest) do redis.call('DEL', key) end
return over
"""


class LMMeter:
    """The LM usage of one module call (all its threads): tokens, cost, cache hits and misses."""

    def __init__(self) -> None:
        from dspy.utils.usage_tracker import UsageTracker  # optional dependency: only DSPy modules get a meter

        self.tracker = UsageTracker()
        self.history = _HistorySink()
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()

    def lookup(self, hit: bool) -> None:
        with self._lock:
            if hit:
                self.hits += 1
            else:
                self.misses += 1

    def usage(self) -> Usage:
        """What the call used: DSPy's token counts (a cache hit adds none) and its priced cost."""
        totals = self.tracker.get_total_tokens().values()
        costs = [entry["cost"] for entry in self.history.entries
                 if entry.get("usage") and isinstance(entry.get("cost"), int | float)]
        return Usage(
            prompt_tokens=sum(int(total.get("prompt_tokens") or 0) for total in totals),
            completion_tokens=sum(int(total.get("completion_tokens") or 0) for total in totals),
            cost=sum(costs) if costs else None,
            cache_hits=self.hits,
            cache_misses=self.misses,
        )


class _HistorySink:
    """Stands in DSPy's ``caller_modules``: every LM history entry of the call is appended here.

    DSPy trims a caller's history to ``max_history_size`` by ``len``/``pop(0)``; this one never fills.
    """

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []

    @property
    def history(self) -> _HistorySink:
        return self

    def __len__(self) -> int:
        return 0

    def append(self, entry: dict[str, Any]) -> None:
        self.entries.append(entry)


def current_meter() -> LMMeter | None:
    """The meter of the module call this thread runs, if any."""
    import dspy  # optional dependency: only called from DSPy's cache, so dspy is imported

    meter = dspy.settings.get(METER_SETTING)
    return meter if isinstance(meter, LMMeter) else None


def redis_lm_cache(store: StateStore, ttl_s: int, max_entries: int) -> Any:
    """A ``RedisLMCache`` (a ``dspy.clients.Cache``) on the state store's Redis."""
    return _redis_cache_class()(store, ttl_s, max_entries)


@functools.cache
def _redis_cache_class() -> type:
    """``RedisLMCache``: made on first use, so that importing this module does not import dspy."""
    from dspy.clients.cache import Cache  # optional dependency: the cache is installed only for DSPy modules

    return type("RedisLMCache", (RedisLMCacheMixin, Cache), {"__doc__": RedisLMCacheMixin.__doc__,
                                                              "__module__": __name__})


class RedisLMCacheMixin:
    """DSPy's cache API (``get``/``put`` by ``cache_key``) over Redis, JSON entries, TTL and LRU bound."""

    cache_key: Any  # from dspy.clients.Cache
    _prepare_cached_response: Any

    def __init__(self, store: StateStore, ttl_s: int, max_entries: int) -> None:
        super().__init__(enable_disk_cache=False, enable_memory_cache=False, disk_cache_dir=None)  # type: ignore[call-arg]
        self.client = store.client
        self.prefix = store.global_key(f"{TAG}:e:")
        self.lru_key = store.global_key(f"{TAG}:lru")
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._put = store.script(_PUT)

    def __contains__(self, key: str) -> bool:
        return bool(self.client.exists(self.prefix + key))

    def get(self, request: dict[str, Any], ignored_args_for_cache_key: list[str] | None = None) -> Any:
        try:
            key = self.prefix + self.cache_key(request, ignored_args_for_cache_key)
        except Exception:  # DSPy's own cache skips what it cannot key (e.g. unencodable arguments)
            return None
        pipe = self.client.pipeline(transaction=False)
        pipe.get(key)
        pipe.zadd(self.lru_key, {key: time.time()}, xx=True)
        try:
            raw, _ = pipe.execute()
        except redis.RedisError as exc:  # the cache must not fail the call: the LM answers instead
            log.warning("LM cache: Redis did not answer (%s); calling the LM", exc)
            raw = None
        value = None if raw is None else self._decode(raw)
        meter = current_meter()
        if meter is not None:
            meter.lookup(value is not None)
        return value

    def put(self, request: dict[str, Any], value: Any, ignored_args_for_cache_key: list[str] | None = None,
            enable_memory_cache: bool = True) -> None:
        try:
            key = self.prefix + self.cache_key(request, ignored_args_for_cache_key)
        except Exception:  # as DSPy's own cache: a request it cannot key is not cached
            return
        encoded = encode_entry(value)
        if encoded is None:
            log.debug("LM cache: a %s response is not JSON; not cached", type(value).__name__)
            return
        try:
            self._put(keys=[key, self.lru_key], args=[encoded, self.ttl_s, time.time(), self.max_entries])
        except redis.RedisError as exc:  # the answer is returned all the same, only not shared
            log.warning("LM cache: Redis did not store an answer (%s)", exc)

    def _decode(self, raw: str | bytes) -> Any:
        try:
            value = decode_entry(raw)
        except Exception as exc:  # an entry of another version, or of a library this worker lacks
            log.warning("LM cache: an entry cannot be read (%s: %s); calling the LM", type(exc).__name__, exc)
            return None
        return self._prepare_cached_response(value) if hasattr(value, "usage") else value

    def reset_memory_cache(self) -> None:
        """No memory tier: nothing to reset."""


def encode_entry(value: Any) -> bytes | None:
    """The JSON of a cached LM response (a pydantic response as its ``model_dump``), or None."""
    from pydantic import BaseModel

    entry: dict[str, Any]
    if isinstance(value, BaseModel):
        cls = type(value)
        entry = {"type": f"{cls.__module__}:{cls.__qualname__}", "data": value.model_dump(mode="json")}
    else:
        entry = {"type": None, "data": value}
    try:
        return orjson.dumps(entry)
    except TypeError:
        return None


def decode_entry(raw: str | bytes) -> Any:
    """The response an entry holds: plain JSON data, or the pydantic response class it names."""
    entry = orjson.loads(raw)
    if entry["type"] is None:
        return entry["data"]
    module_name, _, qualname = str(entry["type"]).partition(":")
    if not module_name.startswith(DECODABLE_PREFIXES):
        raise ValueError(f"entry type {entry['type']} is not a known LM response class")
    module = sys.modules.get(module_name) or importlib.import_module(module_name)
    cls: Any = module
    for part in qualname.split("."):
        cls = getattr(cls, part)
    return cls.model_validate(entry["data"])


_installed: dict[str, Any] = {}
_install_lock = threading.Lock()


def install_lm_cache(runtime: Runtime) -> None:
    """Make the shared LM cache ``dspy.cache`` in this process when the ``lm_cache`` setting is
    ``redis`` (once per process; ``off`` leaves DSPy's cache as it is)."""
    settings = runtime.settings
    if settings.lm_cache != "redis" or "cache" in _installed:
        return
    import dspy  # optional dependency: only a module with dspy settings gets here

    with _install_lock:
        if "cache" in _installed:
            return
        cache = redis_lm_cache(runtime.store, settings.lm_cache_ttl_s, settings.lm_cache_max_entries)
        with dspy._cache_lock:  # what dspy.configure_cache holds, so a lazy first read cannot overwrite it
            dspy.cache = cache
        _installed["cache"] = cache
