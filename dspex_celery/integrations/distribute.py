"""``distribute(module)``: an existing imperative ``dspy.Module`` runs on the cluster unchanged.

Calling the result runs the module's ``forward`` here, in the client, with every call of a named
sub-module (an attribute that is a ``dspy.Module``, ``dspy.Predict`` included) sent as one module
task of one execution (strategy ``forward``) to its resource class. A call returns at once with a
:class:`LazyResult`; reading a field waits for it, so calls that do not wait on each other overlap,
and loops and branches are plain Python. A lazy result passed to another call is a dependency: that
call is sent by the session's dispatcher thread when its inputs are ready, and its worker reads them
from the store. Sub-modules of ``dspy``'s own classes (Predict, ChainOfThought, ...) and user
modules without sub-modules are called remotely; a user module made of sub-modules runs its own
``forward`` here too, its parts dispatched under nested paths (``hop.generate_query``).

Each call is a module record named ``path.index`` (``generate_query.0``); a re-run of the same
execution (:func:`resume_forward`) replays ``forward`` and takes each finished call's stored output.
Workers rebuild the module from its class, ``with_`` and ``dump_state()`` (stored once per state):
see :mod:`~dspex_celery.integrations.distribute_worker`.
"""

from __future__ import annotations

import asyncio
import copy
import fnmatch
import hashlib
import inspect
import json
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import redis
from celery import Celery

from dspex_celery import defaults
from dspex_celery.app import unsubscribed_dispatch
from dspex_celery.bootstrap import default_runtime
from dspex_celery.canvas import hard_time_limit, task_id
from dspex_celery.client import new_execution_id
from dspex_celery.embedded import EmbeddedWorker
from dspex_celery.errors import ModuleError, UnknownExecution, UsageError
from dspex_celery.execution import Execution
from dspex_celery.graph import is_allowed, package_of, resolve_uses
from dspex_celery.integrations.distribute_worker import (
    CALLS,
    REF,
    RUN_CALL,
    at_path,
    call_plan_json,
    output_value,
    state_digest,
    state_key,
)
from dspex_celery.integrations.dspy_plan import require_dspy
from dspex_celery.integrations.dspy_worker import append_trace, read_trace
from dspex_celery.plan import ModulePlan, Plan
from dspex_celery.presence import warn_if_unserved
from dspex_celery.results import ExecutionStatus, ModuleRecord, ModuleStatus, isoformat, utcnow
from dspex_celery.routing import queue_name, worker_queues
from dspex_celery.runtime import Runtime, runtime_of
from dspex_celery.spec import BreakerPolicy, RetryPolicy
from dspex_celery.strategies.forward import CALLS_DONE, ForwardStrategy

__all__ = ["CallFailed", "CallOutputNotJson", "DistributedModule", "LazyResult", "distribute", "lazy_field", "resume_forward"]

#: The execution key part of the set of calls whose message was sent (a replay does not send them again).
CALLS_SENT = "calls:sent"
#: Seconds the dispatcher blocks on the list of finished calls before it polls their records.
POLL_S = 0.5


class CallFailed(ModuleError):
    """A sub-module call failed on the cluster (read when its output is used)."""


class CallOutputNotJson(CallFailed, UsageError):
    """A sub-module returned something JSON cannot carry (fix the module: exit 2)."""


@dataclass(frozen=True)
class Config:
    """How a distributed module runs: what workers rebuild it from and where its calls go."""

    class_ref: str
    with_: dict[str, Any]
    dspy: dict[str, str]
    resources: dict[str, str]
    app: Celery | None = None
    timeout_s: float | None = None
    retry: dict[str, Any] = field(default_factory=lambda: RetryPolicy().model_dump(mode="json"))

    @property
    def runtime(self) -> Runtime:
        return runtime_of(self.app) if self.app is not None else default_runtime()

    def resource_of(self, path: str) -> str:
        """The resource class of a call at ``path``: an exact key, else the longest matching pattern."""
        if path in self.resources:
            return self.resources[path]
        matches = sorted((key for key in self.resources if fnmatch.fnmatchcase(path, key)), key=len, reverse=True)
        return self.resources[matches[0]] if matches else defaults.RESOURCE

    def to_meta(self, digest: str) -> dict[str, Any]:
        return {"class": self.class_ref, "with": self.with_, "dspy": self.dspy, "resources": self.resources,
                "timeout_s": self.timeout_s, "retry": self.retry, "state": digest}


# --- the public entry point ------------------------------------------------------------------------


def distribute(
    module: Any,
    *,
    lm: str | None = None,
    adapter: str | None = None,
    resources: Mapping[str, str] | None = None,
    app: Celery | None = None,
    with_: Mapping[str, Any] | None = None,
    timeout_s: float | None = None,
    retry: Mapping[str, Any] | None = None,
) -> DistributedModule:
    """A ``dspy.Module`` that runs ``module``'s ``forward`` with its sub-module calls on the cluster.

    ``lm``/``adapter``: ``package.module:factory`` paths workers call to build them (no key crosses
    the broker); ``resources``: resource class per sub-module path or pattern (``{"retrieve": "io",
    "*": "llm"}``); ``with_``: the constructor's keyword arguments workers rebuild the class with;
    ``timeout_s``/``retry``: per call. Raises :class:`UsageError` (one line) for what workers could
    not run: not a ``dspy.Module``, a class outside the allow-list or not importable, a constructor
    that needs arguments not given.
    """
    dspy = require_dspy("distribute()")
    if not isinstance(module, dspy.Module):
        raise UsageError(f"distribute() takes a dspy.Module instance, got {type(module).__name__}")
    config = Config(
        class_ref=class_reference(type(module)), with_=dict(with_ or {}),
        dspy={key: path for key, path in (("lm", lm), ("adapter", adapter)) if path},
        resources=dict(resources or {}), app=app, timeout_s=timeout_s,
        retry=RetryPolicy.model_validate(dict(retry or {})).model_dump(mode="json"),
    )
    check_allowed_here(config)
    check_buildable(config, type(module))
    check_factories(config)
    return DistributedModule(module, config)


def class_reference(cls: type) -> str:
    """``package.module:Class`` for a class workers can import (a one-line UsageError if not)."""
    if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
        raise UsageError(f"distribute(): class {cls.__qualname__} is defined in {cls.__module__} (or inside a "
                         "function), which workers cannot import: move it to an importable module")
    return f"{cls.__module__}:{cls.__qualname__}"


def check_buildable(config: Config, cls: type) -> None:
    """Workers build ``cls(**with_)``: refuse a constructor that cannot be called so."""
    try:
        cls(**config.with_)
    except Exception as exc:  # the user's constructor may raise anything
        raise UsageError(f"distribute(): workers cannot build {cls.__qualname__}(**{config.with_!r}) "
                         f"({type(exc).__name__}: {exc}): pass its constructor's keyword arguments as "
                         "with_={...} (CLI: --with k=v)") from None


def check_factories(config: Config) -> None:
    """The ``lm``/``adapter`` factories must import (workers call them; a typo would fail every call)."""
    for key, path in config.dspy.items():
        try:
            resolve_uses(path)
        except ImportError as exc:
            raise UsageError(f"distribute(): {key} factory '{path}' cannot be imported ({exc}): "
                             "pass package.module:factory") from None


def check_allowed_here(config: Config) -> None:
    """With an allow-list configured here (``DSPEX_MODULES``), refuse what workers would refuse."""
    allowed = tuple(config.runtime.settings.allowed_packages)
    for what in (config.class_ref, *config.dspy.values()):
        if allowed and not is_allowed(what, allowed):
            raise UsageError(f"distribute(): '{what}' is outside the allow-list ({', '.join(allowed)}): "
                             f"add --modules {package_of(what)} (DSPEX_MODULES) if you trust that module")


def _module_base() -> type:
    module: type = require_dspy("distribute()").Module
    return module


class DistributedModule(_module_base()):  # type: ignore[misc]
    """The ``dspy.Module`` :func:`distribute` returns: ``forward`` runs a :class:`ForwardSession`.

    Its parameters are the wrapped module's (optimizers compile it, ``save``/``load`` keep the wrapped
    module's state keys), and a deep copy shares the configuration (app, resources).
    """

    def __init__(self, module: Any, config: Config) -> None:
        super().__init__()
        self.module = module
        self._config = config

    def __deepcopy__(self, memo: dict[int, Any]) -> DistributedModule:
        return DistributedModule(copy.deepcopy(self.module, memo), self._config)

    def dump_state(self, json_mode: bool = True) -> Any:
        return self.module.dump_state(json_mode=json_mode)

    def load_state(self, state: Any, **options: Any) -> Any:
        self.module.load_state(state, **options)
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        inputs = bound_inputs(self.module, args, kwargs)
        return ForwardSession.new(self._config, self.module, inputs).run()

    async def aforward(self, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(self.forward, *args, **kwargs)

    def run(self, execution_id: str | None = None, **inputs: Any) -> Any:
        """``forward(**inputs)`` under a chosen execution id (a re-run with it replays finished calls)."""
        inputs = bound_inputs(self.module, (), inputs)
        return ForwardSession.new(self._config, self.module, inputs, execution_id).run()


def bound_inputs(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """``forward``'s arguments by name, JSON-able (they are the execution's inputs)."""
    try:
        # the class's function: reading module.forward outside a call makes dspy warn
        arguments = inspect.signature(type(module).forward).bind(module, *args, **kwargs).arguments
        inputs = dict(list(arguments.items())[1:])
    except TypeError as exc:
        raise UsageError(f"{type(module).__name__}.forward(): {exc}") from None
    try:
        json.dumps(inputs, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{type(module).__name__}.forward() inputs must be JSON values ({exc})") from None
    return inputs


def resume_forward(execution_id: str, *, app: Celery | None = None) -> Any:
    """Replay a distributed execution from its stored class, state and inputs.

    A running one (its client died) goes on under the same id; an ended one is re-run under a new id
    with its succeeded calls reused. Either way a finished call is not called again.
    """
    runtime = runtime_of(app) if app is not None else default_runtime()
    meta = runtime.store.meta(execution_id)
    spec = meta.get("distribute")
    if not meta or spec is None:
        raise UnknownExecution(f"cannot resume '{execution_id}': not a distributed module's execution "
                               "(unknown, expired, or a program file's: use dspex-celery resume)")
    config = Config(class_ref=spec["class"], with_=spec["with"], dspy=spec["dspy"], resources=spec["resources"],
                    app=app, timeout_s=spec.get("timeout_s"), retry=spec["retry"])
    module = rebuild_here(runtime, config, spec["state"])
    return ForwardSession.new(config, module, meta.get("inputs", {}), execution_id).run()


def rebuild_here(runtime: Runtime, config: Config, digest: str) -> Any:
    instance: Any = resolve_uses(config.class_ref)(**config.with_)
    raw = runtime.store.client.get(state_key(runtime.store, digest))
    if raw is not None:
        instance.load_state(json.loads(raw))
    return instance


# --- lazy results ----------------------------------------------------------------------------------


class LazyResult:
    """A sub-module call's result, on its way: reading anything of it waits for the call."""

    __slots__ = ("_session", "_name", "_field")

    def __init__(self, session: ForwardSession, name: str, field: str | None = None) -> None:
        self._session = session
        self._name = name
        self._field = field

    def _resolve(self) -> Any:
        value = self._session.value(self._name)
        return value if self._field is None else getattr(value, self._field)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self._resolve(), name)

    def __getitem__(self, key: Any) -> Any:
        return self._resolve()[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._resolve())

    def __len__(self) -> int:
        return len(self._resolve())

    def __contains__(self, item: Any) -> bool:
        return item in self._resolve()

    def __bool__(self) -> bool:
        return bool(self._resolve())

    def __eq__(self, other: object) -> bool:
        return bool(self._resolve() == (other._resolve() if isinstance(other, LazyResult) else other))

    __hash__ = None  # type: ignore[assignment]

    def __str__(self) -> str:
        return str(self._resolve())

    def __repr__(self) -> str:
        done = self._session.is_done(self._name)
        return repr(self._resolve()) if done else f"<pending call {self._name}>"


def lazy_field(result: Any, field: str) -> Any:
    """One field of a call's result, still on its way (reading ``result.field`` would wait): passed to
    another call, it is a dependency like the whole result. In-process (a real result) it is
    ``getattr(result, field)``, so the module runs the same both ways."""
    if not isinstance(result, LazyResult) or result._field is not None:
        return getattr(result, field)
    return LazyResult(result._session, result._name, field)


def resolved(value: Any) -> Any:
    """``value`` with every lazy result in it (Predictions, lists, dicts) replaced by what it is."""
    if isinstance(value, LazyResult):
        return resolved(value._resolve())
    if isinstance(value, list | tuple):
        return type(value)(resolved(item) for item in value)
    if isinstance(value, dict):
        return {key: resolved(item) for key, item in value.items()}
    dspy = require_dspy("distribute()")
    if isinstance(value, dspy.Example):
        for key in list(value.keys(include_dspy=True)):
            value[key] = resolved(value[key])
    return value


# --- the remote sub-modules ------------------------------------------------------------------------


class RemoteSubModule:
    """Stands for a sub-module in ``forward``: a call sends it; anything else reads the real one."""

    def __init__(self, session: ForwardSession, path: str, module: Any) -> None:
        self._session = session
        self._path = path
        self._module = module

    def __call__(self, *args: Any, **kwargs: Any) -> LazyResult:
        return self._session.submit(self._path, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def is_remote(module: Any, path: str, config: Config) -> bool:
    """Called remotely as one call: dspy's own classes, user modules without sub-modules, and any
    path ``resources`` names exactly; other modules run their ``forward`` here."""
    dspy = require_dspy("distribute()")
    own_parts = any(isinstance(value, dspy.Module) or (isinstance(value, list) and
                    any(isinstance(item, dspy.Module) for item in value)) for value in vars(module).values())
    return type(module).__module__.startswith("dspy.") or not own_parts or path in config.resources


def intercepted(module: Any, session: ForwardSession, prefix: str = "") -> Any:
    """A shallow copy of ``module`` whose sub-modules (attributes, and lists of them) are
    :class:`RemoteSubModule` s, or intercepted copies of their own (recursively)."""
    dspy = require_dspy("distribute()")
    clone = copy.copy(module)
    clone.__dict__.update({key: vars(module)[key] for key in ("callbacks", "history") if key in vars(module)})
    for attr, value in vars(module).items():
        if attr.startswith("_"):
            continue
        if isinstance(value, dspy.Module):
            clone.__dict__[attr] = stand_in(value, session, f"{prefix}{attr}")
        elif isinstance(value, list) and value and all(isinstance(item, dspy.Module) for item in value):
            clone.__dict__[attr] = [stand_in(item, session, f"{prefix}{attr}[{index}]")
                                    for index, item in enumerate(value)]
    return clone


def stand_in(module: Any, session: ForwardSession, path: str) -> Any:
    """What ``forward`` sees of the sub-module at ``path``: a remote one, or an intercepted copy."""
    if is_remote(module, path, session.config):
        return RemoteSubModule(session, path, module)
    return intercepted(module, session, f"{path}.")


# --- one forward: an execution ---------------------------------------------------------------------


@dataclass
class Call:
    """A sub-module call of the session: its plan entry, what it waits for, and how it ended."""

    plan: ModulePlan
    waiting_for: set[str]
    #: The caller's ``dspy.settings.trace`` (None: not tracing): the call's trace is added to it.
    trace: list[Any] | None = None
    output: dict[str, Any] | None = None
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.output is not None or self.error is not None


class ForwardSession:
    """One run of ``forward``: one execution whose modules are its calls, added as they are made."""

    def __init__(self, config: Config, runtime: Runtime, execution_id: str, module: Any,
                 inputs: dict[str, Any]) -> None:
        self.config = config
        self.runtime = runtime
        self.store = runtime.store
        self.execution_id = execution_id
        self.module = module
        self.inputs = inputs
        self.calls: dict[str, Call] = {}
        self.counters: dict[str, int] = {}
        self.changed = threading.Condition()
        self.closed = threading.Event()
        self.dispatcher: threading.Thread | None = None
        self.plan_stored = 0  # calls in the plan stored last (the dispatcher stores a newer one)
        self.fresh = False  # stored by this session: no call of it can have run before (no replay)
        self.classes_checked: set[str] = set()  # resource classes checked for a live worker
        self.program = type(module).__qualname__

    @classmethod
    def new(cls, config: Config, module: Any, inputs: dict[str, Any],
            execution_id: str | None = None) -> ForwardSession:
        """A session under ``execution_id`` (a stored one is replayed) or a fresh one, stored now."""
        runtime = config.runtime
        store = runtime.store
        if execution_id is not None and store.exists(execution_id) and store.is_finished(execution_id) \
                and store.meta_field(execution_id, "status") != ExecutionStatus.SUCCEEDED.value:
            session = cls(config, runtime, new_execution_id(), module, inputs)  # it ended: resume it
            session.create()
            session.reuse(execution_id)
            return session
        session = cls(config, runtime, execution_id or new_execution_id(), module, inputs)
        if execution_id is None or not store.exists(execution_id):
            session.create()
        else:
            session.prepare()  # a replay: its calls still need a worker (embedded) or a reachable cluster
        return session

    # --- the execution in the store ---

    def create(self) -> None:
        """Store the execution: an empty plan (calls are added as made), its meta, the state once."""
        state = json.dumps(self.module.dump_state(), sort_keys=True)
        digest = state_digest(state)
        self.store.client.set(state_key(self.store, digest), state, ex=self.store.ttl_s)
        self.prepare()
        meta = {
            "program": self.program, "fingerprint": self.fingerprint(digest), "strategy": ForwardStrategy.name,
            "inputs": self.inputs, "status": ExecutionStatus.RUNNING.value, "submitted_at": isoformat(utcnow()),
            "timeout_s": None, "deadline": None, "resumed_from": None, "started": True,
            "distribute": self.config.to_meta(digest),
        }
        self.store.create(self.execution_id, self.plan({}), meta)
        self.fresh = True

    def fingerprint(self, digest: str) -> str:
        content = json.dumps([self.config.class_ref, self.config.with_, self.config.resources, digest], sort_keys=True)
        return hashlib.sha256(content.encode()).hexdigest()[:16]

    def plan(self, modules: dict[str, ModulePlan]) -> Plan:
        return Plan(program=self.program, fingerprint=self.store.meta_field(self.execution_id, "fingerprint", "")
                    if modules else "", inputs=tuple(self.inputs), modules=modules, levels=[list(modules)],
                    outputs={}, critical_path=[], failure_tolerance="tolerant")

    def prepare(self) -> None:
        """Embedded: allow the module's package and consume its resource classes' queues."""
        if not self.runtime.settings.embedded:
            self.runtime.check_reachable()
            return
        if not self.runtime.settings.allowed_packages:
            self.runtime.allowed |= {package_of(ref).split(".")[0] for ref in (self.config.class_ref,
                                                                               *self.config.dspy.values())}
        classes = sorted({defaults.RESOURCE, *self.config.resources.values()})
        queues = worker_queues(self.runtime.settings.namespace, classes)
        if self.runtime.embedded_worker is None:
            self.runtime.embedded_worker = EmbeddedWorker(self.runtime.app, queues,
                                                          self.runtime.settings.embedded_concurrency)
        else:
            self.runtime.embedded_worker.consume(queues)

    def reuse(self, source_id: str) -> None:
        """Copy the succeeded calls of ended execution ``source_id`` into this one (``reused``)."""
        store = self.store
        records = store.records(source_id)
        done = [name for name, record in records.items() if record.status is ModuleStatus.SUCCEEDED]
        entries = store.client.hmget(store.key(source_id, CALLS), done) if done else []
        outputs = store.outputs(source_id, done)
        execution = Execution(self.runtime, self.execution_id)
        for name, entry in zip(done, entries, strict=True):
            if entry is not None and name in outputs:
                store.client.hset(store.key(self.execution_id, CALLS), name, entry)
                store.put_output(self.execution_id, name, outputs[name])
                execution.write_record(name, records[name].model_copy(update={"reused": True}))
        store.update_meta(self.execution_id, resumed_from=source_id)
        self.fresh = False  # its reused calls are taken as a replay takes them

    # --- running forward ---

    def run(self) -> Any:
        """Run ``forward`` here with its calls on the cluster; finish the execution with its outcome."""
        try:
            value = resolved(intercepted(self.module, self)(**self.inputs))
            self.wait_all()
        except BaseException as exc:
            self.finish(ExecutionStatus.FAILED, f"{type(exc).__name__}: {exc}")
            raise
        self.finish(ExecutionStatus.SUCCEEDED, None)
        return value

    def wait_all(self) -> None:
        """Wait for the calls ``forward`` never read (in-process, each had run before it returned);
        one that failed fails the forward, as it would have in-process."""
        with self.changed:
            names = list(self.calls)
        for name in names:
            self.value(name)

    def finish(self, status: ExecutionStatus, error: str | None) -> None:
        """Store the plan with every call made, then end the execution (open calls are cancelled)."""
        self.closed.set()
        Execution(self.runtime, self.execution_id, self.store_plan()).finish(status, error)

    def store_plan(self) -> Plan:
        """Store the plan with the calls made so far (``show`` and ``report`` read it); workers keep
        their cached plan and take each call's entry from the ``calls`` hash."""
        with self.changed:
            modules = {name: call.plan for name, call in self.calls.items()}
            self.plan_stored = len(modules)
        plan = self.plan(modules)
        self.store.client.set(self.store.key(self.execution_id, "plan"), plan.to_json(), ex=self.store.ttl_s)
        return plan

    # --- calls ---

    def submit(self, path: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> LazyResult:
        """Make call ``path.N``: taken from the store when it finished before, else sent (now, or once
        the calls it waits for are done)."""
        with self.changed:
            index = self.counters.get(path, 0)
            self.counters[path] = index + 1
        name = f"{path}.{index}"
        parents: set[str] = set()
        trace = require_dspy("distribute()").settings.trace
        inputs = {"path": path, "args": self.encode(name, list(args), parents),
                  "kwargs": self.encode(name, kwargs, parents), "trace": trace is not None}
        self.start(Call(self.call_plan(name, path, inputs, parents), set(parents), trace))
        return LazyResult(self, name)

    def call_plan(self, name: str, path: str, inputs: dict[str, Any], parents: set[str]) -> ModulePlan:
        return ModulePlan(
            name=name, uses=self.config.class_ref, inputs=inputs, depends_on=(), parents=tuple(sorted(parents)),
            children=(), resource=self.config.resource_of(path), level=0, priority=0.0,
            with_=dict(self.config.with_), timeout_s=self.config.timeout_s, retry=self.config.retry,
            circuit_breaker=BreakerPolicy().model_dump(mode="json"), dspy=dict(self.config.dspy),
        )

    def encode(self, name: str, value: Any, parents: set[str]) -> Any:
        """``value`` as JSON, lazy results of this session as references (added to ``parents``)."""
        if isinstance(value, LazyResult):
            if value._session is self:
                parents.add(value._name)
                return {REF: value._name, "field": value._field}
            value = value._resolve()
        if isinstance(value, list | tuple):
            return [self.encode(name, item, parents) for item in value]
        if isinstance(value, dict):
            return {str(key): self.encode(name, item, parents) for key, item in value.items()}
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            raise UsageError(f"call '{name}': argument {value!r:.60} ({type(value).__name__}) is not JSON: "
                             "pass JSON values (str, number, bool, list, dict, None) or another call's result") from None
        return value

    def start(self, call: Call) -> None:
        """A call stored finished (a replay) is done; one already sent is waited for; else send it
        (its entry is stored before the dispatcher can see it, so a worker always finds it)."""
        name, store = call.plan.name, self.store
        if not self.fresh and self.replayed(call):
            return
        self.ensure_dispatcher()
        self.check_served(call.plan)
        pipe = store.client.pipeline(transaction=False)
        pipe.hset(store.key(self.execution_id, CALLS), name, call_plan_json(call.plan))
        pipe.expire(store.key(self.execution_id, CALLS), store.ttl_s)
        pipe.execute()
        with self.changed:
            self.calls[name] = call
            self.refresh_waiting(call)
            ready = not call.waiting_for and not call.done
        if ready:
            self.send(call.plan)
        elif call.error is not None:
            self.skip(call.plan, sorted(call.plan.parents)[0])

    def check_served(self, module: ModulePlan) -> None:
        """Warn (UnservedResourceWarning) once per resource class that no live worker serves: its calls
        would wait in their queue, and ``forward`` with them."""
        if module.resource not in self.classes_checked:
            self.classes_checked.add(module.resource)
            warn_if_unserved(self.runtime, self.plan({module.name: module}))

    def replayed(self, call: Call) -> bool:
        """In a replay: True when the call finished (its stored output is taken) or was sent (it is
        waited for); a call that failed is cleared to run again (False)."""
        name, store = call.plan.name, self.store
        sent = store.key(self.execution_id, CALLS_SENT)
        record = store.record(self.execution_id, name)
        if record.status is ModuleStatus.SUCCEEDED or (not record.status.final and store.client.sismember(sent, name)):
            self.ensure_dispatcher()
            with self.changed:
                self.calls[name] = call
            self.settle(name)  # nothing yet unless it finished
            return True
        if record.status.final:  # failed in the run this replays: run it again
            store.client.hdel(store.key(self.execution_id, "rec"), name)
            store.client.srem(sent, name)
        return False

    def send(self, module: ModulePlan) -> None:
        options: dict[str, Any] = {
            "queue": queue_name(self.runtime.settings.namespace, module.resource),
            "task_id": task_id(self.execution_id, module.name),
            "shadow": f"dspex.call:{self.program}.{module.name}",
        }
        if module.timeout_s:
            options.update(soft_time_limit=module.timeout_s, time_limit=hard_time_limit(module.timeout_s))
        with unsubscribed_dispatch():
            self.runtime.app.send_task(RUN_CALL, args=(self.execution_id, module.name), **options)
        sent = self.store.key(self.execution_id, CALLS_SENT)
        pipe = self.store.client.pipeline(transaction=False)
        pipe.sadd(sent, module.name)
        pipe.expire(sent, self.store.ttl_s)
        pipe.execute()

    def refresh_waiting(self, call: Call) -> None:
        """Drop the calls ``call`` waits for that are done; a failed one fails ``call`` too."""
        for parent in list(call.waiting_for):
            upstream = self.calls.get(parent)
            if upstream is not None and upstream.done:
                call.waiting_for.discard(parent)
                if upstream.error is not None and call.error is None:
                    call.error = f"not run: call '{parent}' it needs failed"
                    self.changed.notify_all()

    def settle(self, name: str) -> None:
        """Take call ``name``'s final outcome from the store; send the calls that were waiting for it."""
        record = self.store.record(self.execution_id, name)
        outputs = self.store.outputs(self.execution_id, [name]) if record.status is ModuleStatus.SUCCEEDED else {}
        ready: list[ModulePlan] = []
        with self.changed:
            call = self.calls.get(name)
            if call is None or call.done or not record.status.final:
                return
            if name in outputs:
                call.output = outputs[name]
                self.add_trace(call)
            else:
                call.error = record.error or f"call ended {record.status.value}"
            for other in self.calls.values():
                if name in other.waiting_for:
                    self.refresh_waiting(other)
                    if not other.waiting_for and not other.done:
                        ready.append(other.plan)
                    elif other.error is not None:
                        self.skip(other.plan, name)
            self.changed.notify_all()
        for module in ready:
            self.send(module)

    def add_trace(self, call: Call) -> None:
        """Append the call's DSPy trace, with this process's predictors, to the caller's trace."""
        if call.trace is None or not call.plan.inputs:
            return
        predictors = dict(at_path(self.module, str(call.plan.inputs["path"])).named_predictors())
        append_trace(call.trace, predictors, read_trace(self.store, self.execution_id, call.plan.name))

    def skip(self, module: ModulePlan, parent: str) -> None:
        record = ModuleRecord(status=ModuleStatus.SKIPPED, error=f"skipped: call '{parent}' failed",
                              resource=module.resource)
        self.runtime.write_record(self.execution_id, module.name, record, False)

    def value(self, name: str) -> Any:
        """What call ``name`` returned, once it has (raises :class:`CallFailed` if it failed)."""
        with self.changed:
            call = self.calls[name]
            while not call.done:
                self.changed.wait(POLL_S)
        if call.error is not None:
            error = CallOutputNotJson if call.error.startswith("ModuleOutputError") else CallFailed
            raise error(f"{self.program}: call '{name}' failed: {call.error}")
        assert call.output is not None
        return output_value(call.output, None)

    def is_done(self, name: str) -> bool:
        with self.changed:
            return self.calls[name].done

    # --- the dispatcher: finished calls in, waiting calls out ---

    def ensure_dispatcher(self) -> None:
        with self.changed:
            if self.dispatcher is None:
                self.dispatcher = threading.Thread(target=self.dispatch_loop, daemon=True,
                                                   name=f"dspex-forward-{self.execution_id[:8]}")
                self.dispatcher.start()

    def dispatch_loop(self) -> None:
        done_key = self.store.key(self.execution_id, CALLS_DONE)
        while not self.closed.is_set():
            try:
                popped = self.store.client.blpop([done_key], timeout=POLL_S)
                if popped is not None:
                    self.settle(popped[1])
                else:
                    self.poll()
                if len(self.calls) != self.plan_stored and not self.closed.is_set():
                    self.store_plan()
            except (redis.RedisError, OSError):  # the store may be down a while: the next round tries again
                time.sleep(POLL_S)
            except Exception as exc:  # a bug here must not leave forward waiting forever
                self.fail_open(f"the dispatcher stopped ({type(exc).__name__}: {exc})")
                return

    def poll(self) -> None:
        """Settle open calls whose record is final (an announcement missed), and notice an ended execution."""
        with self.changed:
            open_calls = [name for name, call in self.calls.items() if not call.done and not call.waiting_for]
        records = self.store.records_of(self.execution_id, open_calls)
        for name, record in records.items():
            if record.status.final:
                self.settle(name)
        if open_calls and self.store.is_finished(self.execution_id):
            claim = self.store.finish_claim(self.execution_id) or {}
            self.fail_open(f"the execution ended ({claim.get('status', '?')}: {claim.get('error') or 'cancelled'})")

    def fail_open(self, reason: str) -> None:
        with self.changed:
            for call in self.calls.values():
                if not call.done:
                    call.error = reason
            self.changed.notify_all()
