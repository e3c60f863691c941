"""``dag``: each module is dispatched the moment its last dependency is done — no level barrier.

Readiness is decided in Redis by one Lua step per finished module: it marks the module done
(once: a repeated notification — its task re-delivered after its worker died — changes nothing, and
hands back the ready children that may never have been dispatched), decrements each child's remaining-dependency
counter and returns the children that reached zero, how many modules are still open, and the
modules that block their children (failed, skipped, cancelled). Two parents finishing at once
therefore never double-dispatch or lose a child, and the module that closes the last open count
finishes the execution — no coordinator, no polling. On success the step runs in the same script
that stores the module's output and record, and, on a Redis broker sharing the store's database
(:mod:`dspex_celery.redis_queues`), pushes the ready children's task messages itself: one round trip
from "returned" to "children queued", and no window in which a dying worker could lose a child.
There, the worker that finished the module may offer to run one ready child itself (worker-local
continuation, :mod:`dspex_celery.continuation`): the same script then leases that child to it
instead of queueing it — or, when it continues none, the module its queues would hand it next (of
this execution, or of another ``dag`` execution that allows it), so the slot goes on without an ack
and a broker fetch.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from celery.canvas import Signature

from dspex_celery.canvas import PLAN_HEADER, module_signature, task_id
from dspex_celery.continuation import TAG_PREFIX, Begun, FirstAttempt, Offer, Taken, UnackedKeys, lease_tag
from dspex_celery.execution import Execution
from dspex_celery.plan import Plan, known_digest
from dspex_celery.redis_queues import BEGIN_LEAD_KEY, LEAD_KEY, PLAN_LEAD_KEY, RedisQueues
from dspex_celery.results import ExecutionStatus, ModuleRecord, ModuleStatus, isoformat, utcnow
from dspex_celery.routing import queue_name, resource_of
from dspex_celery.state import (CLAIM_STEP_ARGS, CLAIM_STEP_KEYS, LuaStep, begin_body, lua_call, module_start,
                                shape_digest, step_shapes)
from dspex_celery.strategies.base import BLOCKING, Strategy, blocking_of, split_blocked

#: The header that lets a worker running another ``dag`` execution take this module's message into its
#: chain (set when the plan has no backups: a winning backup revokes its attempt's task, which in a
#: chain is another module's); take-next reads it from the message's lead (_lead).
CHAIN_HEADER = "dspex_chain"

# The body of the count's take_next(): when none of the ready children is continued here (none ready,
# none this worker serves, or a more urgent module queued), the worker takes the module it would be
# sent next anyway: the oldest message of the most urgent non-empty list of its queues, leased to it as
# a continued child is — only a message a dag count or start wrote (its lead, see _lead: a
# ``run_module`` message, never delayed), of this execution or of another ``dag`` execution whose lead
# says it may run in a chain (its plan has no backups), and without a Celery time limit where the
# worker may not run one in a chain; any other message there (another task, a levels module, a retry)
# stays for a slot that frees. The lead is read with a pattern: no message is decoded here. The module
# taken is begun too (take_begin) when its message carries a begin spec (BEGIN_LEAD_KEY, after the
# lead and the plan digest: StateStore.begin_spec) of the shape this count was composed with: the
# running record is the worker's own (one per list it reads), the rest is the spec's, so the worker
# starts it without a begin round trip of its own.
# ``first``: the KEYS index of the worker's first queue list; ``own``: this execution's task-id prefix.
_LEAD_PATTERN = '^{"' + LEAD_KEY + '": "([01])([01])([^"\\\\]+)"'  # a Lua pattern, in a Lua string
_PLAN_PATTERN = '^{"' + LEAD_KEY + '": "[^"]*", "' + PLAN_LEAD_KEY + '": "(%x+)"'  # the plan digest after it
_SPEC_PATTERNS = ('^{"' + LEAD_KEY + '": "[^"]*", "' + BEGIN_LEAD_KEY + '": (%b[])',
                  '^{"' + LEAD_KEY + '": "[^"]*", "' + PLAN_LEAD_KEY + '": "%x+", "' + BEGIN_LEAD_KEY + '": (%b[])')
_TAKE_NEXT = """
local base = a + 6 + 4 * n
if ARGV[base + 1] ~= '1' then return end
for j = 1, tonumber(ARGV[base + 4]) do
  local raw = redis.call('LINDEX', KEYS[first + j - 1], -1)
  if raw then
    local chains, limited, id = string.match(raw, '""" + _LEAD_PATTERN + """')
    if not id then return end
    if string.sub(id, 1, #own) == own then
      local module = string.sub(id, #own + 1)
      if module == '' or string.find(module, '.', 1, true) then return end
    elseif chains ~= '1' or not string.match(id, '^[^.]+%.[^.]+$') then
      return
    end
    if ARGV[base + 2] ~= '1' and limited == '1' then return end
    redis.call('RPOP', KEYS[first + j - 1])
    lease(id, raw, ARGV[base + 4 + j], KEYS[first + j - 1])
    local digest = string.match(raw, '""" + _PLAN_PATTERN + """')
    local begun = take_begin(raw, j)
    if digest or begun then result[4] = {id, begun, digest or false, begun and ARGV[base + 4 + j] or false} end
    return
  end
end
"""

# A LuaStep body — KEYS[k..k+5]: deps hash, done set (created by the first count, so each count sets its
# TTL), open counter, blocking hash, queued set, the stored messages of children not ready yet; when
# enqueuing, then each child's queue list, then kombu's unacked index and hash (continuation leases),
# then where a lease to the offering worker's chain is noted (continuation.chain_key; unused without an offer).
# ARGV[a..]: ttl, module, its status if it blocks its children ('' otherwise), number of children n,
# enqueue ('1'/'0'), children...; when enqueuing, then each child's task message ('' when an earlier
# count stored it: a child of several parents has its message built once per worker process, see
# _MessagesSent; a child not made ready here keeps the message it was sent), then each child's
# queue name if this worker may continue it ('' otherwise), the time (the lease's score), then per
# child how many of the KEYS after the unacked index are its queue's more urgent
# lists (a child is continued only while they are empty: a slot that frees takes the most urgent
# queued module, continuation must not jump ahead of it), then the tag of the lease this module ran
# under ('' if none), released here (the ack of a continued module), then whether the worker may take
# its next queued module here ('1'/'0', see _TAKE_NEXT), whether it may run one with a time limit, the
# execution's task-id prefix and the number m of the worker's queue lists (the KEYS after the more
# urgent lists, in the order it reads them), then each one's queue name, then the shape digest of the
# begin specs a module it takes may be begun with ('' for none, see take_begin) and the running record
# of a first attempt of a module of each list, then the child it begins when it leases it ('' for
# none, see _ahead) and that begin's args (its keys follow the lists' keys).
# Returns {repeated (0/1), open_left, #ready, the task id (EXEC.MODULE) of the module leased to the
# worker or '' (with what else the count read of it, see parse_count), ready...,
# blocking module, its status, ...}: the ready children left to the caller — none when they were
# enqueued (or one leased, see dspex_celery.continuation) here, which happens only while no module
# blocks its children, but those whose stored message is gone — and the blocking modules only with
# ready ones. A repeated count (a re-delivered task) changes nothing and reports the children this module made ready that were not enqueued here: its
# first worker may have died before it dispatched them.
_COUNT_HEAD = """
local n = tonumber(ARGV[a + 3])
local ready = {}
local repeated = redis.call('SADD', KEYS[k + 1], ARGV[a + 1]) == 0
local open_left
if repeated then
  for i = 1, n do
    local child = ARGV[a + 4 + i]
    if tonumber(redis.call('HGET', KEYS[k], child)) == 0 and redis.call('SISMEMBER', KEYS[k + 4], child) == 0 then
      table.insert(ready, i)
    end
  end
  local open = redis.call('GET', KEYS[k + 2])
  open_left = open and tonumber(open) or -1
else
  redis.call('EXPIRE', KEYS[k + 1], ARGV[a])
  if ARGV[a + 2] ~= '' then
    redis.call('HSET', KEYS[k + 3], ARGV[a + 1], ARGV[a + 2])
    redis.call('EXPIRE', KEYS[k + 3], ARGV[a])
  end
  for i = 1, n do
    if redis.call('HINCRBY', KEYS[k], ARGV[a + 4 + i], -1) == 0 then table.insert(ready, i) end
  end
  open_left = redis.call('DECR', KEYS[k + 2])
end
local result = {repeated and 1 or 0, open_left, 0, ''}
local enqueue = ARGV[a + 4] == '1'
if enqueue and not repeated then
  local made_ready, stored = {}, false
  for _, i in ipairs(ready) do made_ready[i] = true end
  for i = 1, n do
    if not made_ready[i] and ARGV[a + 4 + n + i] ~= '' then
      redis.call('HSET', KEYS[k + 5], ARGV[a + 4 + i], ARGV[a + 4 + n + i])
      stored = true
    end
  end
  if stored then redis.call('EXPIRE', KEYS[k + 5], ARGV[a]) end
end
if enqueue and ARGV[a + 6 + 4 * n] ~= '' then
  redis.call('ZREM', KEYS[k + 6 + n], ARGV[a + 6 + 4 * n])
  redis.call('HDEL', KEYS[k + 7 + n], ARGV[a + 6 + 4 * n])
  redis.call('DEL', KEYS[k + 8 + n])
end
local urgent, first = {}, k + 9 + n
if enqueue then
  for i = 1, n do
    urgent[i] = first
    first = first + tonumber(ARGV[a + 5 + 3 * n + i])
  end
end
local own = ARGV[a + 9 + 4 * n]
local m = enqueue and tonumber(ARGV[a + 10 + 4 * n]) or 0
local ahead = enqueue and ARGV[a + 12 + 4 * n + 2 * m] or ''
local take_shape = enqueue and ARGV[a + 11 + 4 * n + m] or ''
local function lease(id, message, queue, list)
  local tag = '""" + TAG_PREFIX + """' .. id
  local suffix = ',"",' .. cjson.encode(queue) .. ']'
  redis.call('HSET', KEYS[k + 7 + n], tag, '[' .. message .. suffix)
  redis.call('ZADD', KEYS[k + 6 + n], ARGV[a + 5 + 3 * n], tag)
  redis.call('SET', KEYS[k + 8 + n], cjson.encode({tag, list, #suffix}), 'EX', ARGV[a])
  result[4] = id
end
local function run_spec(KEYS, ARGV)
"""
_COUNT_TAKE = """end
local function take_begin(raw, j)
  if take_shape == '' then return false end
  local spec = string.match(raw, '""" + _SPEC_PATTERNS[0] + """') or string.match(raw, '""" + _SPEC_PATTERNS[1] + """')
  if not spec then return false end
  local decoded, parsed = pcall(cjson.decode, spec)
  if not decoded or type(parsed) ~= 'table' or parsed[1] ~= take_shape then return false end
  local keys, args = parsed[2], parsed[3]
  if type(keys) ~= 'table' or type(args) ~= 'table' or #keys < 4 or #args < 5 then return false end
  for _, list in ipairs({keys, args}) do
    for _, item in ipairs(list) do if type(item) ~= 'string' then return false end end
  end
  local steps, parents = tonumber(args[4]), tonumber(args[5])
  if not steps or not parents or #args ~= 5 + steps + parents then return false end
  args[3] = ARGV[a + 11 + 4 * n + m + j]
  local ran, reply = pcall(run_spec, keys, args)  -- a spec no worker wrote must not fail the count
  return ran and reply
end
local function take_next()
""" + _TAKE_NEXT + """end
local function begin_ahead()
"""
_COUNT_TAIL = """end
if #ready == 0 then
  if enqueue and not repeated then take_next() end
  return result
end
local blocking = redis.call('HGETALL', KEYS[k + 3])
if not repeated and enqueue and #blocking == 0 then
  local function nothing_more_urgent(i)
    for key = urgent[i], urgent[i] + tonumber(ARGV[a + 5 + 3 * n + i]) - 1 do
      if redis.call('LLEN', KEYS[key]) > 0 then return false end
    end
    return true
  end
  for _, i in ipairs(ready) do
    local child, queue = ARGV[a + 4 + i], ARGV[a + 4 + 2 * n + i]
    local message = ARGV[a + 4 + n + i]
    if message == '' then message = redis.call('HGET', KEYS[k + 5], child) end
    redis.call('HDEL', KEYS[k + 5], child)
    if not message then  -- its stored message is gone: left to the caller
      result[3] = result[3] + 1
      table.insert(result, child)
    else
      if result[4] == '' and queue ~= '' and nothing_more_urgent(i) then
        lease(own .. child, message, queue, KEYS[k + 5 + i])
        if child == ahead then result[4] = {result[4], begin_ahead()} end
      else
        redis.call('LPUSH', KEYS[k + 5 + i], message)
      end
      redis.call('SADD', KEYS[k + 4], child)
    end
  end
  redis.call('EXPIRE', KEYS[k + 4], ARGV[a])
  if result[4] == '' then take_next() end
  return result
end
result[3] = #ready
for _, i in ipairs(ready) do table.insert(result, ARGV[a + 4 + i]) end
for _, item in ipairs(blocking) do table.insert(result, item) end
return result
"""


@functools.cache
def _count_done(begin: str = "return false", take: str = "return false") -> str:
    """The count's body; ``begin``: the body of the begin step of the child it may begin ahead (its
    keys after the worker's lists, its args after theirs), run when it leases that child; ``take``: the
    body of the begin step a module it takes next is begun with (keys and args from its spec)."""
    call = lua_call(begin, "first + m", "a + 13 + 4 * n + 2 * m")
    return _COUNT_HEAD + f"return {lua_call(take, 1, 1)}\n" + _COUNT_TAKE + f"return {call}\n" + _COUNT_TAIL


_COUNT_DONE = _count_done()
_COUNT_ALONE = "return " + lua_call(_COUNT_DONE, 1, 1)


@functools.cache
def _count_and_claim(claim: str, take: str) -> str:
    """A sink's count followed, when it closed the last open module, by the execution's finish claim
    (``claim``: its Lua, whose CLAIM_STEP_KEYS keys and CLAIM_STEP_ARGS args come first): its reply
    is the count's with the claim's appended, so finishing takes no round trip of its own."""
    count = lua_call(_count_done(take=take), f"k + {CLAIM_STEP_KEYS}", f"a + {CLAIM_STEP_ARGS}")
    return (f"local count = {count}\n"
            f"if count[1] == 0 and count[2] == 0 then count[5] = {lua_call(claim, 'k', 'a')} end\n"
            "return count")

class DagStrategy(Strategy):
    """Dependency-driven dispatch with atomic per-execution counters in the state store."""

    name = "dag"

    def start(self, execution: Execution) -> None:
        plan = execution.require_plan()
        records = {name: record for name, record in execution.store.records(execution.id).items()
                   if record.status.final}
        self._init_counters(execution, plan, records)
        if len(records) == len(plan.modules):
            execution.finish(ExecutionStatus.SUCCEEDED)
            return
        ready = self._dispatch_ready(execution, plan, roots(plan, records), blocking_of(records))
        self._drain(execution, plan, ready)

    def module_finished(self, execution: Execution, module: str, status: ModuleStatus) -> None:
        if execution.store.is_finished(execution.id):
            return
        plan = execution.require_plan()
        self._drain(execution, plan, [self._count_alone(execution, plan, module, status)])

    def module_succeeded(self, execution: Execution, module: str, output: dict[str, Any],
                         record: ModuleRecord, offer: Offer | None = None) -> bool:
        plan, queues = execution.require_plan(), execution.runtime.queues
        ahead = _ahead(execution, plan, module, offer) if queues is not None else None
        step = self._count_step(execution, plan, module, ModuleStatus.SUCCEEDED, queues, offer, ahead)
        reply = execution.store.save_success(execution.id, module, output, record, then=step)
        if reply is None:
            return False
        if offer is not None:
            count = parse_count(reply)
            offer.claimed, offer.plan = count.continued or None, count.plan
            if count.begun is not None and count.taken is not None and offer.steps is not None:
                record = ModuleRecord.model_validate_json(offer.records[count.taken])
                offer.begun = Taken(count.continued, count.begun, record, offer.steps)
            elif ahead is not None and count.begun is not None:
                child, attempt = ahead
                offer.begun = Begun(count.continued, attempt, module_start(count.begun, plan.modules[child].parents))
        self._drain(execution, plan, [reply])
        return True

    def starts_in_pipeline(self, execution: Execution) -> bool:
        """When the store writes the broker's queues (a Redis broker in its database) and there are modules."""
        return execution.runtime.queues is not None and bool(execution.require_plan().modules)

    def queue_start(self, execution: Execution, pipe: Any) -> None:
        """A new execution's counters, then its roots' task messages (most urgent first), as :meth:`start`."""
        plan, runtime = execution.require_plan(), execution.runtime
        queues = runtime.queues
        assert queues is not None, "queue_start without starts_in_pipeline"
        deps_key, _, open_key, *_ = self._keys(execution)
        pipe.hset(deps_key, mapping={name: len(module.parents) for name, module in plan.modules.items()})
        pipe.set(open_key, len(plan.modules))
        for key in (deps_key, open_key):
            pipe.expire(key, execution.store.ttl_s)
        chains = _chains(plan)
        for name in _by_urgency(plan, roots(plan, {})):
            pipe.lpush(*_message(queues, execution, plan, name, dag_signature(execution, plan, name, chains)))

    # --- counters -------------------------------------------------------------------------------

    def _keys(self, execution: Execution) -> list[str]:
        parts = ("dag:deps", "dag:done", "dag:open", "dag:blocking", "dag:queued", "dag:messages")
        return [execution.store.key(execution.id, part) for part in parts]

    def _init_counters(self, execution: Execution, plan: Plan, records: dict[str, ModuleRecord]) -> None:
        deps_key, done_key, open_key, blocking_key, _, messages_key = self._keys(execution)
        counts: dict[str | bytes, int] = {
            name: sum(parent not in records for parent in module.parents)
            for name, module in plan.modules.items()
        }
        blocking = blocking_of(records)
        store = execution.store
        pipe = store.client.pipeline()
        pipe.delete(messages_key)  # a resumed execution's children get messages of its new plan
        pipe.hset(deps_key, mapping=counts)
        if records:
            pipe.sadd(done_key, *records)
        if blocking:
            pipe.hset(blocking_key, mapping=blocking)
        pipe.set(open_key, len(plan.modules) - len(records))
        for key in (deps_key, done_key, open_key, blocking_key):
            pipe.expire(key, store.ttl_s)
        pipe.execute()

    def _count_step(self, execution: Execution, plan: Plan, module: str, status: ModuleStatus,
                    queues: RedisQueues | None = None, offer: Offer | None = None,
                    ahead: tuple[str, FirstAttempt] | None = None) -> LuaStep:
        """The count of a finished ``module``; with ``queues``, its ready children are enqueued by it,
        and, with an ``offer``, the most urgent one the offering worker may run is leased to it instead
        (and begun too when it is the ``ahead`` child: see :func:`_ahead`)."""
        runtime = execution.runtime
        blocks = status.value if status in BLOCKING else ""
        children = _by_urgency(plan, plan.modules[module].children)
        keys = self._keys(execution)
        args: list[Any] = [runtime.store.ttl_s, module, blocks, len(children), "1" if queues else "0", *children]
        if queues is not None:
            namespace, chains = runtime.settings.namespace, _chains(plan)
            signatures = [dag_signature(execution, plan, child, chains) for child in children]
            messages = [_SENT.message(queues, execution, plan, child, signature) if index < INLINE_MESSAGES
                        or len(plan.modules[child].parents) > 1 else _no_message(queues, signature)
                        for index, (child, signature) in enumerate(zip(children, signatures, strict=True))]
            keys += [key for key, _ in messages]
            args += [message for _, message in messages]
            unacked = offer.keys if offer is not None else UnackedKeys.of(runtime.app)
            keys += [unacked.index, unacked.messages, offer.chain if offer is not None else unacked.messages]
            continuable = [_continuable(plan, child, namespace, offer) for child in children]
            urgent = [_more_urgent(queues, queue, int(signature.options["priority"])) if queue else []
                      for queue, signature in zip(continuable, signatures, strict=True)]
            held = lease_tag(execution.id, module) if offer is not None and offer.held else ""
            args += [*continuable, time.time(), *map(len, urgent), held]
            keys += [key for lists in urgent for key in lists]
            lists = _worker_lists(queues, offer.queues) if offer is not None and chains else ()
            args += ["1" if lists else "0", "1" if offer is not None and offer.timeouts else "0",
                     task_id(execution.id, ""), len(lists), *(queue for _, queue in lists)]
            keys += [key for key, _ in lists]
            take, shape, records = _take_begin(offer, lists, namespace)
            args += [shape, *records]
            if not children and not execution.store.clustered:
                claim = execution.finish_claim_step(ExecutionStatus.SUCCEEDED)
                return LuaStep(_count_and_claim(claim.source, take), [*claim.keys, *keys], [*claim.args, *args, ""])
            if ahead is not None:
                child, attempt = ahead
                begin = execution.store.begin_step(execution.id, child, plan.modules[child].parents, attempt.record,
                                                   [step for _, step in attempt.steps])
                return LuaStep(_count_done(begin.source, take), [*keys, *begin.keys], [*args, child, *begin.args])
            return LuaStep(_count_done(take=take), keys, [*args, ""])
        return LuaStep(_COUNT_DONE, keys, args)

    def _count_alone(self, execution: Execution, plan: Plan, module: str, status: ModuleStatus) -> list[Any]:
        """Count a finished module in a script of its own (failed, skipped, cancelled, or repeated)."""
        step = self._count_step(execution, plan, module, status)
        return list(execution.store.script(_COUNT_ALONE)(keys=step.keys, args=step.args))

    def _drain(self, execution: Execution, plan: Plan, replies: list[list[Any]]) -> None:
        """Act on count replies until none is left: the counts of skipped modules join the work list,
        so a failure above a branch of any depth is settled in a loop, not by recursion."""
        while replies:
            replies += self._go_on(execution, plan, parse_count(replies.pop()))

    def _go_on(self, execution: Execution, plan: Plan, count: Count) -> list[list[Any]]:
        """Dispatch the children a count made ready and finish when nothing is left open; returns the
        count replies of the children it skipped.

        After a repeated count (the module's task was re-delivered: its worker died), only the ready
        children that never started are dispatched — at least once, as Celery's late acks promise.
        """
        ready = count.ready
        if count.repeated and ready:
            started = execution.store.records_of(execution.id, ready)
            ready = [name for name in ready if name not in started]
        skipped = self._dispatch_ready(execution, plan, ready, count.blocking)
        if count.open_left == 0:
            execution.finish(ExecutionStatus.SUCCEEDED, claimed=count.claimed)
        return skipped

    # --- dispatch -------------------------------------------------------------------------------

    def _dispatch_ready(self, execution: Execution, plan: Plan, ready: list[str],
                        blocking: Mapping[str, str]) -> list[list[Any]]:
        """Send ready modules, most urgent (longest remaining path) first; skip blocked ones and
        return the replies of their counts.

        Module results are not stored in the result backend: records and outputs live in the state store.
        """
        runtime = execution.runtime
        runnable, blocked = split_blocked(plan, _by_urgency(plan, ready), blocking)
        chains = _chains(plan)
        signatures = [dag_signature(execution, plan, name, chains) for name in runnable]
        if runtime.queues is not None and signatures:  # one round trip for all (a program's roots: many)
            pipe = execution.store.client.pipeline(transaction=True)
            for name, signature in zip(runnable, signatures, strict=True):
                pipe.lpush(*_message(runtime.queues, execution, plan, name, signature))
            queued = self._keys(execution)[4]  # so a repeated count does not send them again
            pipe.sadd(queued, *runnable).expire(queued, execution.store.ttl_s)
            pipe.execute()
        else:
            for signature in signatures:
                signature.apply_async(ignore_result=True)
        skipped: list[list[Any]] = []
        for name, parent in blocked:
            execution.skip(name, parent, blocking[parent])
            if not execution.store.is_finished(execution.id):
                skipped.append(self._count_alone(execution, plan, name, ModuleStatus.SKIPPED))
        return skipped


#: How many of a count's children (most urgent first) have their task message built before the count
#: and pushed by its script; a child made ready by this count alone (one parent) beyond them is queued
#: right after it (_dispatch_ready, one pipeline), so that a module with many children (a fan-out of
#: 200) does not keep idle slots waiting while it builds every message first.
INLINE_MESSAGES = 16


def _no_message(queues: RedisQueues, signature: Signature) -> tuple[str, str]:
    """What a count is sent for a child whose message it does not get (already sent to an earlier count,
    see _MessagesSent, or left to its caller, see :data:`INLINE_MESSAGES`): its queue key and ''."""
    return queues.key(str(signature.options["queue"]), int(signature.options["priority"])), ""


class _MessagesSent:
    """The children of several parents whose task message this process already sent to a count (which
    stored it until the child is ready): a later parent's count sends '' instead of building it again
    (≈ 50 µs and a kilobyte each, per parent). Bounded: the oldest entries are forgotten first, and a
    forgotten one is just built again; thread-safe."""

    def __init__(self, bound: int = 65536) -> None:
        self._sent: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._bound = bound
        self._lock = threading.Lock()

    def message(self, queues: RedisQueues, execution: Execution, plan: Plan, child: str,
                signature: Signature) -> tuple[str, str]:
        """The child's queue key and its message, '' when a count was already sent it."""
        if len(plan.modules[child].parents) < 2:  # made ready by this count whenever it succeeds
            return _message(queues, execution, plan, child, signature)
        key = (execution.id, child)
        with self._lock:
            if key in self._sent:
                return _no_message(queues, signature)
            self._sent[key] = None
            if len(self._sent) > self._bound:
                self._sent.popitem(last=False)
        return _message(queues, execution, plan, child, signature)


_SENT = _MessagesSent()


class Count(NamedTuple):
    """A count step's reply: whether it repeated an earlier count, how many modules are still open,
    the children it made ready (and left to the caller), the modules blocking their children, the
    task id (``EXEC.MODULE``) of the module it leased to the worker that offered to continue ('' for none),
    the reply of that module's begin when the count began it too and, when it took another execution's
    module, the digest of that one's plan text; the queue of a module it took next and began from its
    message's spec (``taken``); from a sink's count that closed the last open module, the reply of the
    finish claim it ran."""

    repeated: bool
    open_left: int
    ready: list[str]
    blocking: dict[str, str]
    continued: str = ""
    claimed: list[Any] | None = None
    begun: list[Any] | None = None
    plan: str | None = None
    taken: str | None = None


def parse_count(reply: list[Any]) -> Count:
    """The :class:`Count` of a raw Lua reply
    ``{repeated, open_left, #ready, continued, ready..., module, status, ...}`` (or, from a sink's count
    that closed the last open module, ``{repeated, 0, 0, continued, claim reply}``), where
    ``continued`` is ``{task id, begin reply}`` when the count began the child it leased, and
    ``{task id, begin reply or nil, plan digest or nil, queue or nil}`` when it took one next (begun
    from its spec, a queue's first-attempt record, when the queue is there)."""
    repeated, left, count = (int(item) for item in reply[:3])
    entry = reply[3] if isinstance(reply[3], list) else [reply[3]]
    continued, begun, digest, queue = (*entry, None, None, None)[:4]
    plan, taken = (None if digest is None else str(digest)), (None if queue is None else str(queue))
    if len(reply) == 5 and isinstance(reply[4], list):
        return Count(bool(repeated), left, [], {}, str(continued), reply[4], plan=plan, taken=taken)
    flat = [str(item) for item in reply[4 + count:]]
    return Count(bool(repeated), left, [str(name) for name in reply[4:4 + count]],
                 dict(zip(flat[::2], flat[1::2], strict=True)), str(continued), begun=begun, plan=plan, taken=taken)


#: The take body of a count that begins no module it takes.
_NO_TAKE = "return false"


def _take_begin(offer: Offer | None, lists: tuple[tuple[str, str], ...], namespace: str) -> tuple[str, str, list[str]]:
    """How a count begins a module it takes next (see _TAKE_NEXT): the begin body it runs a spec with,
    that body's shape digest ('' for none) and a first attempt's running record for each of the worker's
    ``lists`` (kept on the offer by queue, for the module the count reports it took)."""
    if not lists or offer is None or offer.steps is None or offer.fresh is None:
        return _NO_TAKE, "", [""] * len(lists)
    fresh, started_at = offer.fresh, isoformat(utcnow())
    offer.records = {queue: fresh(resource_of(namespace, queue), started_at) for queue in {queue for _, queue in lists}}
    shapes = step_shapes([step for _, step in offer.steps])
    return begin_body(shapes), shape_digest(shapes), [offer.records[queue] for _, queue in lists]


@functools.lru_cache(maxsize=256)
def _more_urgent(queues: RedisQueues, queue: str, priority: int) -> tuple[str, ...]:
    """The lists of ``queue`` a worker reads before the one a message of ``priority`` is on (the same
    for every count of a queue and priority: cached)."""
    own = queues.key(queue, priority)
    lists = [queues.key(queue, step) for step in queues.priority_steps]
    return tuple(lists[:lists.index(own)])


def _chains(plan: Plan) -> bool:
    """Whether a worker may take this plan's queued modules into a chain in a slot that just freed: not
    when a module has a ``backup_after_s`` (as :func:`_continuable`). Read once per plan (every count
    asks; a plan never changes)."""
    entry = _CHAINS.get(id(plan))
    if entry is None or entry[0] is not plan:
        if len(_CHAINS) >= _CHAINS_BOUND:
            _CHAINS.clear()
        entry = _CHAINS[id(plan)] = (plan, all(module.backup_after_s is None for module in plan.modules.values()))
    return entry[1]


#: :func:`_chains` of the plans seen lately (by identity, with the plan itself so an id is never reused).
_CHAINS: dict[int, tuple[Plan, bool]] = {}
_CHAINS_BOUND = 1024


def dag_signature(execution: Execution, plan: Plan, name: str, chains: bool) -> Signature:
    """The task of module ``name``; its message carries :data:`CHAIN_HEADER` when ``chains``, and
    :data:`PLAN_HEADER` when this process knows its plan text's digest."""
    runtime = execution.runtime
    signature = module_signature(runtime.app, plan, execution.id, name, runtime.settings.namespace)
    headers: dict[str, Any] = {CHAIN_HEADER: True} if chains else {}
    digest = known_digest(plan)
    if digest is not None:
        headers[PLAN_HEADER] = digest
    if headers:
        signature.options["headers"] = headers
    return signature


def _message(queues: RedisQueues, execution: Execution, plan: Plan, name: str, signature: Signature) -> tuple[str, str]:
    """The queue key and task message of dag module ``name``, with its lead (then its plan's digest and
    the begin spec of its first attempt, when there are)."""
    spec = _begin_spec(execution, plan, name)
    digest = signature.options.get("headers", {}).get(PLAN_HEADER)
    lead: dict[str, Any] = {LEAD_KEY: _lead(signature)}
    if digest:
        lead[PLAN_LEAD_KEY] = digest
    if spec is not None:
        lead[BEGIN_LEAD_KEY] = spec
    return queues.message(signature, lead)


def _begin_spec(execution: Execution, plan: Plan, name: str) -> list[Any] | None:
    """The begin spec of module ``name``'s first attempt (:meth:`StateStore.begin_spec`), with which a
    worker that takes its message next begins it in the same script; None when a hook's begin step is
    not portable (:attr:`Hook.begin_step_portable`)."""
    runtime, module = execution.runtime, plan.modules[name]
    steps = runtime.hooks.portable_begin_steps(runtime, plan, module)
    return None if steps is None else runtime.store.begin_spec(execution.id, name, module.parents, steps)


def _lead(signature: Signature) -> str:
    """What a dag module's message says first, for _TAKE_NEXT: whether another execution's chain may
    take it (CHAIN_HEADER), whether it has a Celery time limit ('1'/'0' each), then its task id."""
    options = signature.options
    chains = bool(options.get("headers", {}).get(CHAIN_HEADER))
    limited = options.get("time_limit") is not None or options.get("soft_time_limit") is not None
    return f"{int(chains)}{int(limited)}{options['task_id']}"


@functools.lru_cache(maxsize=64)
def _worker_lists(queues: RedisQueues, names: frozenset[str]) -> tuple[tuple[str, str], ...]:
    """The lists of a worker's queues ``names`` in the order its BRPOP reads them (kombu: by priority,
    then by queue), each with its queue's name (the same for every count it offers: cached)."""
    return tuple((queues.key(name, step), name) for step in queues.priority_steps for name in sorted(names))


def _continuable(plan: Plan, child: str, namespace: str, offer: Offer | None) -> str:
    """The child's queue when the offering worker may run it itself, else ''. Not a child with a
    ``backup_after_s``: a backup that wins revokes the task its attempt runs in (here, its parent's)."""
    if offer is None:
        return ""
    module = plan.modules[child]
    queue = queue_name(namespace, module.resource)
    allowed = (offer.timeouts or module.timeout_s is None) and module.backup_after_s is None
    return queue if allowed and queue in offer.queues else ""


def _ahead(execution: Execution, plan: Plan, module: str, offer: Offer | None) -> tuple[str, FirstAttempt] | None:
    """The child the count of ``module`` may begin as well as lease, with how its first attempt starts:
    the most urgent child the offering worker may continue, when ``module`` is its only parent (so the
    count makes it ready); the count begins it only if it leases it (nothing more urgent queued)."""
    if offer is None or offer.ahead is None or not offer.queues:
        return None
    namespace = execution.runtime.settings.namespace
    for child in _by_urgency(plan, plan.modules[module].children):
        if _continuable(plan, child, namespace, offer):
            return (child, offer.ahead(plan, child)) if len(plan.modules[child].parents) == 1 else None
    return None


def roots(plan: Plan, done: Mapping[str, ModuleRecord]) -> list[str]:
    """The modules not ``done`` whose parents all are: what a (resumed) execution starts with."""
    return [name for name, module in plan.modules.items()
            if name not in done and all(parent in done for parent in module.parents)]


def _by_urgency(plan: Plan, names: Iterable[str]) -> list[str]:
    """Most urgent (longest remaining path) first, then by name."""
    return sorted(names, key=lambda name: (-plan.modules[name].priority, name))
