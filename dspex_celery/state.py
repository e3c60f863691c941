"""Execution state store: plan, inputs, module outputs and module records, per execution, in Redis.

Task messages carry only ``(execution_id, module)``; everything else lives here with a TTL. The
embedded mode uses the same code over an in-process Redis (fakeredis), so there is one store.
"""

from __future__ import annotations

import functools
import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from dspex_celery.plan import Plan, plan_digest, plan_text, remember_digest
from dspex_celery.redis_clients import (DirectLinkLost, DirectScripts, ReplicaSync, connect, is_cluster_client,
                                        is_sentinel_url)
from dspex_celery.results import ModuleRecord

PLAN_CACHE_SIZE = 512
#: Plan texts whose parsed plan a process keeps: the executions of a batch share one plan text.
PLAN_TEXT_CACHE_SIZE = 16

#: The module's attempts, one JSON entry per finished attempt (``report`` and history read them).
ATTEMPTS = "attempts"

# KEYS: finished flag, outputs, records, attempts, meta (then the keys of the step).
# ARGV: ttl, module, output JSON, record JSON, attempt JSON (then the args of the step).
# Returns {-2} when the execution already finished, {-3} when the module already has a final record
# (a backup attempt or the attempt it backs up finished first: first wins), {-4} when its state is
# gone (expired, or Redis restarted without persistence: writing would recreate a part of it, the
# step's counters without a TTL), nothing written in these cases; else the step's reply.
_SAVE_SUCCESS = """
if redis.call('EXISTS', KEYS[1]) == 1 then return {-2} end
if redis.call('EXISTS', KEYS[5]) == 0 then return {-4} end
local previous = redis.call('HGET', KEYS[3], ARGV[2])
local status = previous and string.match(previous, '^{"status":"(%a+)"')
if status == 'succeeded' or status == 'failed' or status == 'skipped' or status == 'cancelled' then return {-3} end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('HSET', KEYS[3], ARGV[2], ARGV[4])
redis.call('RPUSH', KEYS[4], ARGV[5])
for i = 2, 4 do redis.call('EXPIRE', KEYS[i], ARGV[1]) end
"""


# A LuaStep body (see begin_body) — KEYS[k..k+3]: records, meta, finished flag, outputs (then the
# keys of the steps). ARGV[a..]: module, ttl, running record JSON, number of step args, number p of
# parents (then the steps' args, then the p parents). Writes the running record only when the module
# has no record yet and the execution goes on (and exists: its meta is there); the steps run only
# then. Returns {previous record or nil, meta as a flat list, finished (0/1), written (0/1), parent
# outputs, the steps' replies...}.
_BEGIN = """
local previous = redis.call('HGET', KEYS[k], ARGV[a])
local finished = redis.call('EXISTS', KEYS[k + 2])
local meta = redis.call('HGETALL', KEYS[k + 1])
local written = 0
if not previous and finished == 0 and #meta > 0 then
  redis.call('HSET', KEYS[k], ARGV[a], ARGV[a + 2])
  redis.call('EXPIRE', KEYS[k], ARGV[a + 1])
  written = 1
end
local first_parent, parents = a + 5 + tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
local outputs = {}
if parents > 0 then outputs = redis.call('HMGET', KEYS[k + 3], unpack(ARGV, first_parent, first_parent + parents - 1)) end
local result = {previous, meta, finished, written, outputs}
"""


# A LuaStep body — KEYS[k..]: finished flag, plan, meta, records, outputs, compensation order,
# compensation records[, live set: left out on a Redis Cluster, where it is in another slot].
# ARGV[a..]: claim JSON, ttl, execution id, whether the live set is in KEYS ('1'/'0').
# Returns {0} when another caller claimed the finish first, {1, 0} when claimed but the plan is gone,
# else {1, 1, meta, records, outputs (each a flat list), compensation order, compensations}.
_CLAIM_FINISH = """
if not redis.call('SET', KEYS[k], ARGV[a], 'NX', 'EX', ARGV[a + 1]) then return {0} end
if ARGV[a + 3] == '1' then redis.call('ZREM', KEYS[k + 7], ARGV[a + 2]) end
if redis.call('EXISTS', KEYS[k + 1]) == 0 then return {1, 0} end
local order = redis.call('LRANGE', KEYS[k + 5], 0, -1)
local compensations = {}
if #order > 0 then compensations = redis.call('HMGET', KEYS[k + 6], unpack(order)) end
return {1, 1, redis.call('HGETALL', KEYS[k + 2]), redis.call('HGETALL', KEYS[k + 3]), redis.call('HGETALL', KEYS[k + 4]),
        order, compensations}
"""
#: The keys and args of a claim step that names the live set (its offsets are fixed where it is composed).
CLAIM_STEP_KEYS, CLAIM_STEP_ARGS = 8, 4


# KEYS: the Celery result key, meta (then the steps' keys). ARGV: the encoded Celery result, its
# expiry seconds (0: none), the number m of meta items, then the meta fields and their JSON values
# (then the steps' args). A stored SUCCESS result is kept (as Celery's own store_result does); the
# meta fields are written either way.
_PUBLISH_RESULT = """
local current = redis.call('GET', KEYS[1])
local ok, stored = pcall(cjson.decode, current or 'null')
if not (ok and type(stored) == 'table' and stored.status == 'SUCCESS') then
  if tonumber(ARGV[2]) > 0 then redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  else redis.call('SET', KEYS[1], ARGV[1]) end
  redis.call('PUBLISH', KEYS[1], ARGV[1])
end
redis.call('HSET', KEYS[2], unpack(ARGV, 4, 3 + tonumber(ARGV[3])))
"""


@dataclass(frozen=True, slots=True)
class FinishState:
    """What the one caller that claimed an execution's finish read in the same round trip; ``gone``:
    its state expired (or Redis restarted without persistence), nothing else was read."""

    gone: bool
    meta: dict[str, Any]
    records: dict[str, ModuleRecord]
    outputs: dict[str, dict[str, Any]]
    compensations: dict[str, str]  # module -> raw compensation record JSON, in their order


@dataclass(frozen=True, slots=True)
class LuaStep:
    """Lua run inside a store script, with its own keys and args.

    ``source`` is the body of ``function(k, a)``: its keys are ``KEYS[k]...`` and its args
    ``ARGV[a]...`` (wherever the script puts them); what it returns is handed back.
    """

    source: str
    keys: Sequence[str] = ()
    args: Sequence[Any] = ()


def lua_call(body: str, first_key: int | str, first_arg: int | str) -> str:
    """A Lua expression calling ``function(k, a) body end`` with the given offsets (numbers, or Lua
    expressions such as ``"k + 8"`` inside another body)."""
    return f"(function(k, a)\n{body}\nend)({first_key}, {first_arg})"


def step_calls(steps: Sequence[LuaStep], first_key: int | str, first_arg: int | str) -> list[str]:
    """The Lua calls of ``steps`` whose keys and args follow one another from these offsets (numbers,
    or Lua expressions such as ``"k + 4"`` inside another body)."""
    calls, keys, args = [], 0, 0
    for step in steps:
        calls.append(lua_call(step.source, _offset(first_key, keys), _offset(first_arg, args)))
        keys, args = keys + len(step.keys), args + len(step.args)
    return calls


def _offset(first: int | str, by: int) -> int | str:
    return first + by if isinstance(first, int) else f"{first} + {by}"


_CLAIM_FINISH_ALONE = "return " + lua_call(_CLAIM_FINISH, 1, 1)


@functools.cache
def begin_body(shapes: tuple[tuple[str, int, int], ...]) -> str:
    """The begin step's body (:data:`_BEGIN`) with steps of these shapes (source, number of keys,
    number of args) run after it, only when the attempt starts (their keys and args follow its own)."""
    steps = [LuaStep(source, [""] * keys, [""] * args) for source, keys, args in shapes]
    calls = [f"  result[{6 + index}] = {call}" for index, call in enumerate(step_calls(steps, "k + 4", "a + 5"))]
    body = "if written == 1 then\n" + "\n".join(calls) + "\nend\n" if calls else ""
    return _BEGIN + body + "return result"


def step_shapes(steps: Sequence[LuaStep]) -> tuple[tuple[str, int, int], ...]:
    """What a begin script composed with ``steps`` depends on: each one's source and numbers of keys and args."""
    return tuple((step.source, len(step.keys), len(step.args)) for step in steps)


@functools.cache
def shape_digest(shapes: tuple[tuple[str, int, int], ...]) -> str:
    """A short name for begin steps of these :func:`step_shapes`: a script composed with them runs a
    begin spec (:meth:`StateStore.begin_spec`) only when the spec names the same."""
    return hashlib.sha1(repr(shapes).encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class ModuleStart:
    """What a worker reads before it runs a module, in one round trip."""

    record: ModuleRecord  # the module's record before this attempt
    meta: dict[str, Any]
    finished: bool
    upstream: dict[str, dict[str, Any]]
    running_written: bool  # the first attempt's running record is stored already
    step_replies: list[Any]  # of the begin steps, in order (empty unless running_written)


class StoreScript:
    """A registered Lua script, called like redis-py's ``Script`` (``keys=``, ``args=``): over the
    calling thread's direct connection where the store has them (:class:`DirectScripts`), through
    redis-py otherwise, and when that connection fails or does not know the script yet."""

    __slots__ = ("_script", "_direct")

    def __init__(self, script: Any, direct: DirectScripts | None) -> None:
        self._script = script
        self._direct = direct

    def __call__(self, keys: Sequence[Any] = (), args: Sequence[Any] = ()) -> Any:
        if self._direct is not None:
            try:
                return self._direct.evalsha(self._script.sha, keys, args)
            except (redis.exceptions.NoScriptError, DirectLinkLost):
                pass  # redis-py loads the script / connects again, with its own retries
        return self._script(keys=keys, args=args)


class StateStore:
    """Keys under ``{namespace}:x:{execution_id}:*``, each expiring after ``ttl_s``."""

    #: Set on a Sentinel-managed store: a module task waits for a replica before it is acknowledged.
    replica_sync: ReplicaSync | None = None

    def __init__(self, client: redis.Redis, namespace: str, ttl_s: int) -> None:
        # decode_responses=True: every reply is str (redis-py's stubs cannot express that)
        self.client: Any = client
        self.namespace = namespace
        self.ttl_s = ttl_s
        self._plans: OrderedDict[str, Plan] = OrderedDict()
        self._lock = threading.Lock()
        self._scripts: dict[str, StoreScript] = {}
        self._direct = DirectScripts(client) if DirectScripts.suits(client) else None

    @classmethod
    def from_url(cls, url: str, namespace: str, ttl_s: int, sentinel_master: str | None = None) -> StateStore:
        """A store on one Redis, a Redis Cluster or a Sentinel-managed master (see :mod:`redis_clients`);
        on a Sentinel-managed one, :attr:`replica_sync` waits for a replica."""
        store = cls(connect(url, sentinel_master=sentinel_master), namespace, ttl_s)
        if is_sentinel_url(url):
            store.replica_sync = ReplicaSync(store.client, store.global_key("replicated"))
        return store

    @classmethod
    def in_memory(cls, namespace: str, ttl_s: int) -> StateStore:
        import fakeredis

        return cls(fakeredis.FakeRedis(server=_shared_fake_server(), decode_responses=True), namespace, ttl_s)

    def script(self, source: str) -> StoreScript:
        """A registered Lua script (EVALSHA, loaded on first use), one object per source."""
        if source not in self._scripts:
            self._scripts[source] = StoreScript(self.client.register_script(source), self._direct)
        return self._scripts[source]

    def key(self, execution_id: str, part: str) -> str:
        """``{ns}:x:{EXEC}:part``: the hash tag ``{EXEC}`` puts one execution's keys in one Redis
        Cluster slot, so each of its scripts and transactions may touch them all."""
        return f"{self.namespace}:x:{{{execution_id}}}:{part}"

    @staticmethod
    def execution_of(key: str) -> str:
        """The execution id in a key made by :meth:`key`."""
        return key.rpartition("{")[2].partition("}")[0]

    @property
    def clustered(self) -> bool:
        """A Redis Cluster: a script touches one execution's keys, or one cross-execution key, only."""
        return is_cluster_client(self.client)

    def global_key(self, part: str) -> str:
        return f"{self.namespace}:{part}"

    # --- executions ---------------------------------------------------------------------------

    def create(self, execution_id: str, plan: Plan, meta: dict[str, Any]) -> None:
        """Write the plan and the execution's metadata (inputs, strategy, times)."""
        pipe = self.client.pipeline()
        self.queue_create(pipe, execution_id, plan_text(plan)[0], meta)
        pipe.execute()

    def queue_create(self, pipe: Any, execution_id: str, plan_json: str, meta: dict[str, Any]) -> None:
        """Add :meth:`create`'s writes to ``pipe`` (``plan_json``: the plan, serialised once for many
        executions of it)."""
        pipe.set(self.key(execution_id, "plan"), plan_json, ex=self.ttl_s)
        pipe.hset(self.key(execution_id, "meta"), mapping={k: json.dumps(v) for k, v in meta.items()})
        pipe.expire(self.key(execution_id, "meta"), self.ttl_s)
        pipe.zadd(self.global_key("live"), {execution_id: _now_score()})

    def plan(self, execution_id: str, digest: str | None = None) -> Plan | None:
        """The execution's plan; read from Redis once per process (plans never change), and not at all
        when this process parsed a plan text of ``digest`` already (the digest its task message carries:
        another execution of the same plan)."""
        with self._lock:
            if execution_id in self._plans:
                self._plans.move_to_end(execution_id)
                return self._plans[execution_id]
        plan = _BY_DIGEST.get(digest) if digest else None
        if plan is None:
            text = self.client.get(self.key(execution_id, "plan"))
            if text is None:
                return None
            plan = parsed_plan(text)
        with self._lock:
            self._plans[execution_id] = plan
            while len(self._plans) > PLAN_CACHE_SIZE:
                self._plans.popitem(last=False)
        return plan

    def meta(self, execution_id: str) -> dict[str, Any]:
        raw = self.client.hgetall(self.key(execution_id, "meta"))
        return {key: json.loads(value) for key, value in raw.items()}

    def meta_field(self, execution_id: str, field: str, default: Any = None) -> Any:
        """One field of the execution's metadata (without reading its inputs)."""
        raw = self.client.hget(self.key(execution_id, "meta"), field)
        return default if raw is None else json.loads(raw)

    def update_meta(self, execution_id: str, **fields: Any) -> None:
        self.client.hset(self.key(execution_id, "meta"), mapping={k: json.dumps(v) for k, v in fields.items()})

    def exists(self, execution_id: str) -> bool:
        return bool(self.client.exists(self.key(execution_id, "plan")))

    def exist(self, execution_ids: Sequence[str]) -> list[bool]:
        """:meth:`exists` of each of ``execution_ids``, in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        for execution_id in execution_ids:
            pipe.exists(self.key(execution_id, "plan"))
        return [bool(found) for found in pipe.execute()]

    def claim_finish(self, execution_id: str, status: str, error: str | None) -> bool:
        """True for exactly one caller: the one that gets to finish the execution (with ``status``)."""
        claim = json.dumps({"status": status, "error": error, "at": time.time()})
        claimed = self.client.set(self.key(execution_id, "finished"), claim, nx=True, ex=self.ttl_s)
        if claimed:
            self.client.zrem(self.global_key("live"), execution_id)
        return bool(claimed)

    def claim_finish_reading(self, execution_id: str, status: str, error: str | None, modules: Sequence[str],
                             compensation_keys: Sequence[str]) -> FinishState | None:
        """:meth:`claim_finish` that also reads what the result is made of (meta, records, the
        ``modules``' outputs, the compensations under ``compensation_keys``: order list, records hash),
        in one round trip; None when another caller claimed it first."""
        step = self.claim_finish_step(execution_id, status, error, compensation_keys)
        reply = self.script(_CLAIM_FINISH_ALONE)(keys=step.keys, args=step.args)
        if int(reply[0]) and self.clustered:
            self.client.zrem(self.global_key("live"), execution_id)
        return finish_state(reply, modules)

    def claim_finish_step(self, execution_id: str, status: str, error: str | None,
                          compensation_keys: Sequence[str]) -> LuaStep:
        """The Lua of :meth:`claim_finish_reading`, to run inside another script (its reply goes to
        :func:`finish_state`); on a Redis Cluster it leaves the live set to the caller."""
        claim = json.dumps({"status": status, "error": error, "at": time.time()})
        keys = [self.key(execution_id, part) for part in ("finished", "plan", "meta", "rec", "out")]
        keys += [compensation_keys[1], compensation_keys[0]]
        if not self.clustered:
            keys.append(self.global_key("live"))
        return LuaStep(_CLAIM_FINISH, keys, [claim, self.ttl_s, execution_id, "0" if self.clustered else "1"])

    def publish_result(self, execution_id: str, result_key: str, encoded: str, expires_s: int,
                       steps: Sequence[LuaStep] = (), **meta: Any) -> None:
        """Store and publish an execution's encoded Celery result (unless a SUCCESS one is stored),
        then its ``meta`` fields, then run ``steps``, in one script; the Celery result key must live
        in this Redis."""
        fields = [item for key, value in meta.items() for item in (key, json.dumps(value))]
        keys: list[str] = [result_key, self.key(execution_id, "meta")]
        args: list[Any] = [encoded, expires_s, len(fields), *fields]
        calls = step_calls(steps, len(keys) + 1, len(args) + 1)
        keys += [key for step in steps for key in step.keys]
        args += [arg for step in steps for arg in step.args]
        self.script(_PUBLISH_RESULT + "".join(f"local _ = {call}\n" for call in calls))(keys=keys, args=args)

    def finish_claim(self, execution_id: str) -> dict[str, Any] | None:
        """What :meth:`claim_finish` stored: ``status``, ``error`` and ``at`` (epoch seconds)."""
        raw = self.client.get(self.key(execution_id, "finished"))
        return None if raw is None else dict(json.loads(raw))

    def is_finished(self, execution_id: str) -> bool:
        return bool(self.client.exists(self.key(execution_id, "finished")))

    def finished_of(self, execution_ids: Sequence[str]) -> list[str]:
        """Those of ``execution_ids`` whose finish was claimed (one round trip)."""
        pipe = self.client.pipeline(transaction=False)
        for execution_id in execution_ids:
            pipe.exists(self.key(execution_id, "finished"))
        return [execution_id for execution_id, found in zip(execution_ids, pipe.execute(), strict=True) if found]

    def live_executions(self) -> list[str]:
        return list(self.client.zrange(self.global_key("live"), 0, -1))

    # --- module outputs and records -----------------------------------------------------------

    def put_output(self, execution_id: str, module: str, output: dict[str, Any]) -> None:
        key = self.key(execution_id, "out")
        pipe = self.client.pipeline()
        pipe.hset(key, module, json.dumps(output))
        pipe.expire(key, self.ttl_s)
        pipe.execute()

    def outputs(self, execution_id: str, modules: Iterable[str]) -> dict[str, dict[str, Any]]:
        """Stored outputs of the given modules (modules without output are left out)."""
        names = list(modules)
        if not names:
            return {}
        values = self.client.hmget(self.key(execution_id, "out"), names)
        return {name: json.loads(value) for name, value in zip(names, values, strict=True) if value is not None}

    def put_record(self, execution_id: str, module: str, record: ModuleRecord, attempt: bool = False) -> None:
        """Store a module record; ``attempt``: it ends an attempt, which is logged too."""
        key = self.key(execution_id, "rec")
        pipe = self.client.pipeline()
        pipe.hset(key, module, record.model_dump_json())
        pipe.expire(key, self.ttl_s)
        if attempt:
            pipe.rpush(self.key(execution_id, ATTEMPTS), attempt_entry(module, record))
            pipe.expire(self.key(execution_id, ATTEMPTS), self.ttl_s)
        pipe.execute()

    def begin(self, execution_id: str, module: str, parents: Sequence[str], first_running: ModuleRecord,
              steps: Sequence[LuaStep] = ()) -> ModuleStart:
        """One round trip before a module runs: its record, the execution's meta and finished flag,
        the parents' outputs; ``first_running`` is stored at once when the module has no record yet
        (its first attempt) and the execution goes on, and ``steps`` (hooks' Lua) run then too."""
        step = self.begin_step(execution_id, module, parents, first_running, steps)
        reply = self.script("return " + lua_call(step.source, 1, 1))(keys=step.keys, args=step.args)
        return module_start(reply, parents)

    def begin_step(self, execution_id: str, module: str, parents: Sequence[str], first_running: ModuleRecord,
                   steps: Sequence[LuaStep] = ()) -> LuaStep:
        """:meth:`begin` as a step of another script (its reply is read by :func:`module_start`)."""
        keys, args = self._begin_keys_args(execution_id, module, parents, first_running.model_dump_json(), steps)
        return LuaStep(begin_body(step_shapes(steps)), keys, args)

    def begin_spec(self, execution_id: str, module: str, parents: Sequence[str],
                   steps: Sequence[LuaStep] = ()) -> list[Any] | None:
        """:meth:`begin_step` of a first attempt as data a script runs for the worker that takes the
        module next (``[shape digest, keys, args]``, every arg a string, the running record's left
        ''; see :func:`begin_body` and ``dspex_celery.strategies.dag``); None when a name holds a
        bracket (a script finds the spec by its balanced brackets)."""
        keys, args = self._begin_keys_args(execution_id, module, parents, "", steps)
        texts = [str(arg) for arg in args]
        if any("[" in text or "]" in text for text in (*keys, *texts)):
            return None
        return [shape_digest(step_shapes(steps)), keys, texts]

    def _begin_keys_args(self, execution_id: str, module: str, parents: Sequence[str], first_running: str,
                         steps: Sequence[LuaStep]) -> tuple[list[str], list[Any]]:
        keys = [self.key(execution_id, part) for part in ("rec", "meta", "finished", "out")]
        keys += [key for step in steps for key in step.keys]
        step_args = [arg for step in steps for arg in step.args]
        return keys, [module, self.ttl_s, first_running, len(step_args), len(parents), *step_args, *parents]

    def save_success(self, execution_id: str, module: str, output: dict[str, Any], record: ModuleRecord,
                     then: LuaStep | None = None) -> list[Any] | None:
        """Atomically store a succeeded module's output, final record and attempt, then run ``then``
        (its reply is returned); None, with nothing written, when the execution already finished, its
        state is gone, or the module already has a final record (the first attempt to finish wins)."""
        step = then or LuaStep("return {0}")
        keys = [self.key(execution_id, part) for part in ("finished", "out", "rec", ATTEMPTS, "meta")]
        args = [self.ttl_s, module, json.dumps(output), record.model_dump_json(), attempt_entry(module, record)]
        source = _SAVE_SUCCESS + "return " + lua_call(step.source, len(keys) + 1, len(args) + 1)
        reply = self.script(source)(keys=[*keys, *step.keys], args=[*args, *step.args])
        return None if reply and int(reply[0]) in (-2, -3, -4) else list(reply)

    def attempts(self, execution_id: str) -> list[dict[str, Any]]:
        """Every finished attempt of the execution's modules, in the order they ended."""
        return [json.loads(item) for item in self.client.lrange(self.key(execution_id, ATTEMPTS), 0, -1)]

    def record(self, execution_id: str, module: str) -> ModuleRecord:
        raw = self.client.hget(self.key(execution_id, "rec"), module)
        return ModuleRecord() if raw is None else ModuleRecord.model_validate_json(raw)

    def records_of(self, execution_id: str, modules: Iterable[str]) -> dict[str, ModuleRecord]:
        """Records of the given modules (modules without a record are left out)."""
        names = list(dict.fromkeys(modules))
        if not names:
            return {}
        values = self.client.hmget(self.key(execution_id, "rec"), names)
        return {
            name: ModuleRecord.model_validate_json(value)
            for name, value in zip(names, values, strict=True)
            if value is not None
        }

    def records(self, execution_id: str) -> dict[str, ModuleRecord]:
        raw = self.client.hgetall(self.key(execution_id, "rec"))
        return {name: ModuleRecord.model_validate_json(value) for name, value in raw.items()}


def module_start(reply: Sequence[Any], parents: Sequence[str]) -> ModuleStart:
    """The :class:`ModuleStart` of a begin step's reply (:data:`_BEGIN`)."""
    raw_record, raw_meta, finished, written, outputs, *replies = reply
    return ModuleStart(
        record=ModuleRecord() if raw_record is None else ModuleRecord.model_validate_json(raw_record),
        meta={key: json.loads(value) for key, value in _pairs(raw_meta)},
        finished=bool(finished),
        upstream={name: json.loads(value) for name, value in zip(parents, outputs, strict=True) if value is not None},
        running_written=bool(written),
        step_replies=list(replies),
    )


@functools.lru_cache(maxsize=PLAN_TEXT_CACHE_SIZE)
def parsed_plan(text: str) -> Plan:
    """The plan of ``text``, parsed once per process for the last few texts (plans never change), and
    found by its text's digest after that (:meth:`StateStore.plan`)."""
    plan = Plan.from_json(text)
    digest = plan_digest(text)
    remember_digest(plan, digest)
    with _BY_DIGEST_LOCK:  # pool threads parse new texts at once: the trim must see one dict at a time
        _BY_DIGEST[digest] = plan
        while len(_BY_DIGEST) > PLAN_TEXT_CACHE_SIZE:
            _BY_DIGEST.pop(next(iter(_BY_DIGEST)))
    return plan


#: The plans :func:`parsed_plan` made lately, by their text's digest (oldest first).
_BY_DIGEST: dict[str, Plan] = {}
_BY_DIGEST_LOCK = threading.Lock()


def finish_state(reply: Sequence[Any], modules: Iterable[str]) -> FinishState | None:
    """What a finish claim's reply read (:data:`_CLAIM_FINISH`): None when another caller claimed it
    first; only the ``modules``' outputs."""
    if not int(reply[0]):
        return None
    if not int(reply[1]):
        return FinishState(True, {}, {}, {}, {})
    raw_meta, raw_records, raw_outputs, order, compensations = reply[2:]
    wanted = set(modules)
    return FinishState(
        gone=False,
        meta={key: json.loads(value) for key, value in _pairs(raw_meta)},
        records={name: ModuleRecord.model_validate_json(value) for name, value in _pairs(raw_records)},
        outputs={name: json.loads(value) for name, value in _pairs(raw_outputs) if name in wanted},
        compensations={name: value for name, value in zip(order, compensations, strict=True) if value is not None},
    )


def _pairs(flat: Sequence[Any]) -> Iterable[tuple[Any, Any]]:
    """The (key, value) pairs of a flat HGETALL reply from a script."""
    return zip(flat[::2], flat[1::2], strict=True)


def attempt_entry(module: str, record: ModuleRecord) -> str:
    """The attempt log's JSON entry for a record that ends an attempt."""
    return json.dumps({"module": module, "attempt": record.attempts, **record.model_dump(mode="json")})


_fake_server_lock = threading.Lock()
_fake_server: Any = None


def _shared_fake_server() -> Any:
    """One in-process Redis server per process, shared by the embedded client and worker."""
    global _fake_server
    import fakeredis

    with _fake_server_lock:
        if _fake_server is None:
            _fake_server = fakeredis.FakeServer()
        return _fake_server


def _now_score() -> float:
    import time

    return time.time()
