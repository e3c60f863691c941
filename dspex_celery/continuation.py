"""Worker-local continuation: a worker runs a ready child of the module it just finished in the same
slot, without a broker round trip, and the child stays as durable as a queued message.

The ``dag`` count script that makes the child ready *leases* it instead of queueing it: it writes the
child's task message into kombu's unacked-message store (the hash and index a Redis worker keeps for
every message it has taken and not acknowledged), exactly as if this worker had just taken it from its
queue. The worker runs the child, then deletes the lease (:meth:`Lease.release`: the ack). A worker
killed meanwhile never acks: kombu's restore sweep on any live worker puts the message back on its
queue once the visibility timeout has passed, and the child runs again (its record shows the lost
attempt) — the same path a message of a killed worker takes. The chain's current lease is also
noted under the task the chain runs in (:func:`chain_key`), so when that task comes back first (a
prefork pool process killed, a retry after a store error) the lease goes back with it
(:func:`restore_chain`) instead of waiting for the sweep. When no ready child is continued, the
count leases the worker the next queued module instead (the message its own fetch would return
next, taken off its queue) — of the same execution, or of another ``dag`` execution whose message
allows it — so a bag of independent modules chains as well, and so do a batch's lines. Only on
a Redis broker that shares the state store's database (:mod:`dspex_celery.redis_queues`): elsewhere
every child goes through the broker.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from celery import Celery
from celery.signals import worker_ready

from dspex_celery.canvas import task_id
from dspex_celery.plan import Plan
from dspex_celery.results import ModuleRecord
from dspex_celery.state import LuaStep, ModuleStart, StateStore, module_start

log = logging.getLogger(__name__)

#: What kombu's Redis transport calls its unacked-message hash and index (its defaults).
KOMBU_UNACKED = ("unacked", "unacked_index")
#: Lease tags start with this (kombu's own tags are uuids): ``dspex-cont:EXEC.MODULE``.
TAG_PREFIX = "dspex-cont:"


@dataclass(frozen=True, slots=True)
class UnackedKeys:
    """kombu's unacked-message hash and its index (delivery tag -> time taken) for an app's broker."""

    messages: str
    index: str

    @classmethod
    def of(cls, app: Celery) -> UnackedKeys:
        options = app.conf.broker_transport_options or {}
        return cls(str(options.get("unacked_key", KOMBU_UNACKED[0])),
                   str(options.get("unacked_index_key", KOMBU_UNACKED[1])))


def lease_tag(execution_id: str, module: str) -> str:
    """The delivery tag of a continued module's lease."""
    return TAG_PREFIX + task_id(execution_id, module)


def chain_key(namespace: str, carrier: str) -> str:
    """Where the count that leases a module to the chain running in task ``carrier`` notes that lease
    (JSON ``[tag, queue list, length of the suffix the lease adds to its message]``), until the chain
    releases it."""
    return f"{namespace}:chain:{carrier}"


# KEYS: the chain's note, kombu's unacked hash and index, the leased module's queue list. ARGV: the
# lease's tag and the length of the suffix it adds to its message. Moves the lease, if still held,
# back onto its queue; drops the note.
_RESTORE_CHAIN = """
redis.call('DEL', KEYS[1])
local entry = redis.call('HGET', KEYS[2], ARGV[1])
if not entry then return 0 end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('LPUSH', KEYS[4], string.sub(entry, 2, #entry - tonumber(ARGV[2])))
return 1
"""


def restore_chain(store: StateStore, keys: UnackedKeys, chain: str) -> bool:
    """The task a chain ran in came back (its worker died, or it is retried): the module the chain had
    leased goes back on its queue now, not after the visibility timeout. True if one went back."""
    note = store.client.get(chain)
    if note is None:
        return False
    tag, queue_list, suffix = json.loads(note)
    restored = bool(store.script(_RESTORE_CHAIN)(keys=[chain, keys.messages, keys.index, queue_list],
                                                 args=[tag, suffix]))
    if restored:
        log.warning("%s: re-queued %s, leased to the chain of a task that came back", chain, tag)
    return restored


@dataclass(frozen=True, slots=True)
class Lease:
    """A continued module, leased to this worker by the count that made it ready."""

    execution_id: str
    module: str
    keys: UnackedKeys
    chain: str

    @classmethod
    def of(cls, leased: str, offer: Offer) -> Lease:
        """The lease of the module whose task id (``EXEC.MODULE``) the strategy leased to ``offer``."""
        execution_id, _, module = leased.rpartition(".")
        return cls(execution_id, module, offer.keys, offer.chain)

    @property
    def task_id(self) -> str:
        return task_id(self.execution_id, self.module)

    def release(self, client: Any) -> None:
        """The ack: the child ran to an end here (its record says how), nothing to re-deliver."""
        tag = lease_tag(self.execution_id, self.module)
        pipe = client.pipeline(transaction=False)
        pipe.zrem(self.keys.index, tag).hdel(self.keys.messages, tag).delete(self.chain).execute()


@dataclass(slots=True)
class CarrierMessage:
    """The message of the task a chain runs in, kept from the broker's restore sweep while the chain goes
    on: kombu re-delivers a message unacknowledged for the visibility timeout, and a chain of modules
    can run longer than one module may. The first hop, then each hop at most every :data:`REFRESH_S`,
    sets the time the message was taken to now, so it is re-delivered only if one module runs that
    long, as a queued module's message would be."""

    tag: str | None
    index: str
    refreshed: float = float("-inf")  # the message may have waited in the worker's prefetch before the chain

    REFRESH_S: ClassVar[float] = 1.0

    @classmethod
    def of(cls, task: Any, offer: Offer | None) -> CarrierMessage:
        properties = getattr(task.request, "properties", None) or {}
        tag = properties.get("delivery_tag") if offer is not None else None
        return cls(tag if isinstance(tag, str) else None, offer.keys.index if offer is not None else "")

    def keep_visible(self, client: Any) -> None:
        """Before a hop: the message counts as taken now (if it is still unacknowledged)."""
        if self.tag is None or time.monotonic() - self.refreshed < self.REFRESH_S:
            return
        client.zadd(self.index, {self.tag: time.time()}, xx=True)
        self.refreshed = time.monotonic()


@dataclass(frozen=True, slots=True)
class FirstAttempt:
    """How a worker starts a module's first attempt: the running record it stores when the module has
    none yet, and the hooks' begin steps, as ``(hook, step)`` pairs."""

    record: ModuleRecord
    steps: list[tuple[Any, LuaStep]]


@dataclass(frozen=True, slots=True)
class Begun:
    """A continued child whose begin ran in the count that leased it (one round trip less): its task id
    (``EXEC.MODULE``), the attempt it started and what that begin read."""

    leased: str
    attempt: FirstAttempt
    start: ModuleStart


@dataclass(frozen=True, slots=True)
class Taken:
    """A module the count took next from this worker's queues and began with the begin spec its message
    carried (``dspex_celery.strategies.dag``): its task id, the begin's raw reply, the running record it
    stored, and the begin steps of the module the count went with — of the same shapes as the spec's
    (the count ran it only then), so their hooks are the ones its steps' replies belong to."""

    leased: str
    reply: list[Any]
    record: ModuleRecord
    steps: list[tuple[Any, LuaStep]]

    def begun(self, parents: Sequence[str]) -> Begun:
        """As a :class:`Begun` (its steps are not run again: they only say whose each reply is)."""
        return Begun(self.leased, FirstAttempt(self.record, self.steps), module_start(self.reply, parents))


@dataclass(slots=True)
class Offer:
    """What a worker that just finished a module offers its strategy: to run one ready child itself.

    ``queues``: the queues this worker consumes (a child of a resource class it does not serve goes
    through the broker); ``chain``: where a lease to it is noted (:func:`chain_key`); ``timeouts``: whether it may continue a child that has a ``timeout_s`` (not
    in a prefork child, where only Celery's per-message time limits stop a call); ``held``: the
    module runs under a lease, which the strategy's count releases once it succeeded; ``ahead``: how
    this worker starts a module's first attempt, so the count that leases a child may begin it too;
    ``fresh``: the JSON running record of a first attempt here, starting at a time, of a module of a
    resource class, and ``steps``: the begin steps of the module the offer goes with, so the count may
    begin a module it takes next from its message's begin spec (when its steps have the same shapes).
    The strategy sets ``claimed`` to the task id (``EXEC.MODULE``) of the module it leased, ``plan``
    to the digest of that module's plan text when it is another execution's and its message names it,
    ``begun`` when it began that module as well, and ``records`` to the records by queue it offered.
    """

    queues: frozenset[str]
    keys: UnackedKeys
    chain: str
    timeouts: bool
    held: bool = False
    ahead: Callable[[Plan, str], FirstAttempt] | None = None
    fresh: Callable[[str, str], str] | None = None
    steps: list[tuple[Any, LuaStep]] | None = None
    claimed: str | None = field(default=None)
    plan: str | None = field(default=None)
    begun: Begun | Taken | None = field(default=None)
    records: dict[str, str] = field(default_factory=dict)


# --- Flower ---------------------------------------------------------------------------------------

#: The worker's own event dispatcher (remembered when the worker is ready: threads and solo pools run
#: tasks in that process; a prefork pool child never sees it, and sends no events for continued modules).
_dispatcher: Any = None


@worker_ready.connect(weak=False)
def _remember_dispatcher(sender: Any = None, **_: Any) -> None:
    global _dispatcher
    _dispatcher = getattr(sender, "event_dispatcher", None)


def task_events_on() -> bool:
    """True when this worker sends task events now (``worker -E``, or Flower turned them on)."""
    dispatcher = _dispatcher
    return bool(dispatcher is not None and dispatcher.enabled and (not dispatcher.groups or "task" in dispatcher.groups))


@dataclass(frozen=True, slots=True)
class TaskEvents:
    """The task events Celery would send for a continued module's own message, so Flower lists it
    (id ``EXEC.MODULE``, name ``dspex.module:PROGRAM.MODULE``) as if it had come through the broker."""

    app: Celery
    hostname: str
    uuid: str

    @classmethod
    def of(cls, app: Celery, hostname: str, execution_id: str, module: str) -> TaskEvents:
        return cls(app, hostname, task_id(execution_id, module))

    def started(self, name: str, args: str, kwargs: str) -> None:
        self._send([("task-received", {"name": name, "args": args, "kwargs": kwargs, "retries": 0}),
                    ("task-started", {})])

    def ended(self, outcome: dict[str, Any], runtime_s: float) -> None:
        status = outcome.get("status")
        if status == "failed":
            self._send([("task-failed", {"exception": str(outcome.get("error", "")), "traceback": ""})])
        elif status == "retrying":
            self._send([("task-retried", {"exception": str(outcome.get("error", "")), "traceback": ""})])
        else:
            self._send([("task-succeeded", {"result": repr(outcome), "runtime": runtime_s})])

    def _send(self, events: list[tuple[str, dict[str, Any]]]) -> None:
        """Best effort, as Celery's own events: a failed send is logged, the module goes on."""
        try:
            with self.app.events.default_dispatcher(hostname=self.hostname) as dispatcher:
                for kind, fields in events:
                    dispatcher.send(kind, uuid=self.uuid, **fields)
        except Exception:  # the broker's connection errors, whatever kombu raises
            log.warning("could not send the task events of %s", self.uuid, exc_info=True)
