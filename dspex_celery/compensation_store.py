"""Compensation records in the state store: one per compensated module, claimed atomically.

``{ns}:x:{EXEC}:comp`` maps each module to its :class:`CompensationRecord` (JSON) and
``{ns}:x:{EXEC}:comp:order`` lists the modules in the order they run; both carry the execution's hash
tag (:meth:`StateStore.key`), so each script touches one Redis Cluster slot.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dspex_celery.results import CompensationRecord
from dspex_celery.state import StateStore

# KEYS: records, order. ARGV: ttl, pending record JSON, modules... Returns 1 when it wrote them (the
# first trigger), 0 when the execution's compensations exist already (a second finisher, a re-delivery).
_INIT = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
for i = 3, #ARGV do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[2])
  redis.call('RPUSH', KEYS[2], ARGV[i])
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[1])
return 1
"""

# KEYS: records. ARGV: module, task id, worker, started_at.
# Returns {verdict, record JSON}: 'run' (claimed by this task: pending, retrying, or running under this
# same task id, whose worker died: then lost_attempts + 1), 'done' (succeeded: never again), 'failed'
# (left for `dspex-celery compensate`), 'busy' (another task runs it), 'unknown' (no such record).
_CLAIM = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return {'unknown', ''} end
local record = cjson.decode(raw)
if record.status == 'succeeded' then return {'done', raw} end
if record.status == 'failed' then return {'failed', raw} end
if record.status == 'running' then
  if record.task_id ~= ARGV[2] then return {'busy', raw} end
  record.lost_attempts = (tonumber(record.lost_attempts) or 0) + 1
end
record.status = 'running'
record.attempts = (tonumber(record.attempts) or 0) + 1
record.task_id = ARGV[2]
record.worker = ARGV[3]
record.started_at = ARGV[4]
record.finished_at = nil
record.duration_s = nil
raw = cjson.encode(record)
redis.call('HSET', KEYS[1], ARGV[1], raw)
return {'run', raw}
"""

# KEYS: records. ARGV: modules... Failed ones become pending again; returns those it reset.
_RESET_FAILED = """
local reset = {}
for i = 1, #ARGV do
  local raw = redis.call('HGET', KEYS[1], ARGV[i])
  if raw then
    local record = cjson.decode(raw)
    if record.status == 'failed' then
      record.status = 'pending'
      redis.call('HSET', KEYS[1], ARGV[i], cjson.encode(record))
      table.insert(reset, ARGV[i])
    end
  end
end
return reset
"""


@dataclass(frozen=True, slots=True)
class Claim:
    """What :func:`claim` found: ``verdict`` (see ``_CLAIM``) and the record after it."""

    verdict: str
    record: CompensationRecord


def keys(store: StateStore, execution_id: str) -> list[str]:
    """The execution's compensation records (hash) and their order (list)."""
    return [store.key(execution_id, "comp"), store.key(execution_id, "comp:order")]


def create(store: StateStore, execution_id: str, modules: Sequence[str]) -> bool:
    """Write a ``pending`` record per module, once per execution; True for the caller that wrote them."""
    if not modules:
        return False
    pending = CompensationRecord().model_dump_json(exclude_none=True)
    return bool(store.script(_INIT)(keys=keys(store, execution_id), args=[store.ttl_s, pending, *modules]))


def records(store: StateStore, execution_id: str) -> dict[str, CompensationRecord]:
    """The execution's compensations in the order they run (empty when it compensates nothing)."""
    records_key, order_key = keys(store, execution_id)
    order = store.client.lrange(order_key, 0, -1)
    if not order:
        return {}
    values = store.client.hmget(records_key, order)
    return {name: CompensationRecord.model_validate_json(value)
            for name, value in zip(order, values, strict=True) if value is not None}


def claim(store: StateStore, execution_id: str, module: str, task_id: str, worker: str,
          started_at: str) -> Claim:
    """Atomically take ``module``'s compensation for ``task_id`` unless it succeeded, failed, or another
    task holds it (:data:`_CLAIM`)."""
    verdict, raw = store.script(_CLAIM)(keys=keys(store, execution_id)[:1],
                                        args=[module, task_id, worker, started_at])
    return Claim(verdict, CompensationRecord.model_validate_json(raw) if raw else CompensationRecord())


def save(store: StateStore, execution_id: str, module: str, record: CompensationRecord) -> None:
    """Store the record of an attempt that ended (succeeded, failed, retrying)."""
    store.client.hset(keys(store, execution_id)[0], module, record.model_dump_json(exclude_none=True))


def reset_failed(store: StateStore, execution_id: str, modules: Sequence[str]) -> list[str]:
    """Make the failed ones of ``modules`` pending again (for a re-run); returns those."""
    if not modules:
        return []
    return list(store.script(_RESET_FAILED)(keys=keys(store, execution_id)[:1], args=list(modules)))

