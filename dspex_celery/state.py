"""Execution state store: plan, inputs, module outputs and module records, per execution, in Redis.

Task messages carry only ``(execution_id, module)``; everything else lives here with a TTL. The
embedded mode uses the same code over an in-process Redis (fakeredis), so there is one store.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from collections import OrderedDict
from typing import Any

import redis

from dspex_celery.plan import Plan
from dspex_celery.results import ModuleRecord

PLAN_CACHE_SIZE = 512


class StateStore:
    """Keys under ``{namespace}:x:{execution_id}:*``, each expiring after ``ttl_s``."""

    def __init__(self, client: redis.Redis, namespace: str, ttl_s: int) -> None:
        # decode_responses=True: every reply is str (redis-py's stubs cannot express that)
        self.client: Any = client
        self.namespace = namespace
        self.ttl_s = ttl_s
        self._plans: OrderedDict[str, Plan] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, namespace: str, ttl_s: int) -> StateStore:
        return cls(redis.Redis.from_url(url, decode_responses=True), namespace, ttl_s)

    @classmethod
    def in_memory(cls, namespace: str, ttl_s: int) -> StateStore:
        import fakeredis

        return cls(fakeredis.FakeRedis(server=_shared_fake_server(), decode_responses=True), namespace, ttl_s)

    def key(self, execution_id: str, part: str) -> str:
        return f"{self.namespace}:x:{execution_id}:{part}"

    def global_key(self, part: str) -> str:
        return f"{self.namespace}:{part}"

    # --- executions ---------------------------------------------------------------------------

    def create(self, execution_id: str, plan: Plan, meta: dict[str, Any]) -> None:
        """Write the plan and the execution's metadata (inputs, strategy, times)."""
        pipe = self.client.pipeline()
        pipe.set(self.key(execution_id, "plan"), plan.to_json(), ex=self.ttl_s)
        pipe.hset(self.key(execution_id, "meta"), mapping={k: json.dumps(v) for k, v in meta.items()})
        pipe.expire(self.key(execution_id, "meta"), self.ttl_s)
        pipe.zadd(self.global_key("live"), {execution_id: _now_score()})
        pipe.execute()

    def plan(self, execution_id: str) -> Plan | None:
        """The execution's plan; read from Redis once per process (plans never change)."""
        with self._lock:
            if execution_id in self._plans:
                self._plans.move_to_end(execution_id)
                return self._plans[execution_id]
        text = self.client.get(self.key(execution_id, "plan"))
        if text is None:
            return None
        plan = Plan.from_json(text)
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

    def claim_finish(self, execution_id: str) -> bool:
        """True for exactly one caller: the one that gets to finish the execution."""
        claimed = self.client.set(self.key(execution_id, "finished"), "1", nx=True, ex=self.ttl_s)
        if claimed:
            self.client.zrem(self.global_key("live"), execution_id)
        return bool(claimed)

    def is_finished(self, execution_id: str) -> bool:
        return bool(self.client.exists(self.key(execution_id, "finished")))

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

    def put_record(self, execution_id: str, module: str, record: ModuleRecord) -> None:
        key = self.key(execution_id, "rec")
        pipe = self.client.pipeline()
        pipe.hset(key, module, record.model_dump_json())
        pipe.expire(key, self.ttl_s)
        pipe.execute()

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
