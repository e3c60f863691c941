"""Compile a plan into Celery signatures: pure functions, no I/O.

A module is one ``run_module`` task. A stage of the ``levels`` family (the strategy decides what its
stages are) is a chord whose body is a small ``advance`` task that dispatches the next stage's
chord: a chain of chords whose messages stay O(1) in program size (Celery's own nested
chain-of-chords copies the rest of the chain into every message).
"""

from __future__ import annotations

import weakref

from celery import Celery, chord, group
from celery.canvas import Signature

from dspex_celery.defaults import HARD_TIMEOUT_GRACE_S
from dspex_celery.plan import Plan
from dspex_celery.routing import control_queue, message_priority, queue_name

RUN_MODULE = "dspex.run_module"
ADVANCE = "dspex.advance"
COMPENSATE = "dspex.compensate"


def task_id(execution_id: str, module: str) -> str:
    """Deterministic Celery task id of a module run (used to revoke and to find it in Flower)."""
    return f"{execution_id}.{module}"


def advance_task_id(execution_id: str, stage: int, *, errback: bool = False) -> str:
    """Celery task id of the ``advance`` task that moves an execution to ``stage``: ``EXEC.advance.N``
    (``EXEC.advance.N.errback`` for the chord's errback), so Flower's search by execution id finds it."""
    return f"{execution_id}.advance.{stage}" + (".errback" if errback else "")


#: The header with the digest of a module's plan text (``plan_digest``): a worker that parsed that text
#: already, for another execution of the plan, does not read the plan again (``StateStore.plan``).
PLAN_HEADER = "dspex_plan"


def module_signature(app: Celery, plan: Plan, execution_id: str, name: str, namespace: str) -> Signature:
    """The task that runs one module on a worker of its resource class."""
    return _module_signature(app, plan, execution_id, name, namespace, broker_url_of(app))


def broker_url_of(app: Celery) -> str:
    """``app.conf.broker_url``, read once per app (Celery's property looks at the environment and its
    configuration chain on every read: a count reads it for each child it sends; an app's broker is
    fixed once it is configured)."""
    url = _BROKER_URLS.get(app)
    if url is None:
        url = _BROKER_URLS[app] = str(app.conf.broker_url)
    return url


_BROKER_URLS: weakref.WeakKeyDictionary[Celery, str] = weakref.WeakKeyDictionary()


def _module_signature(
    app: Celery, plan: Plan, execution_id: str, name: str, namespace: str, broker_url: str
) -> Signature:
    module = plan.modules[name]
    options: dict[str, object] = {
        "queue": queue_name(namespace, module.resource),
        "task_id": task_id(execution_id, name),
        "shadow": f"dspex.module:{plan.program}.{name}",
        "priority": message_priority(plan.urgency(name), broker_url),
        # what Celery's saferepr would make of these short strings, without its cost per message
        "argsrepr": repr((execution_id, name)),
        "kwargsrepr": repr({"program": plan.program}),
    }
    if module.timeout_s:
        options["soft_time_limit"] = module.timeout_s
        options["time_limit"] = hard_time_limit(module.timeout_s)
    return _immutable(app, RUN_MODULE, (execution_id, name), {"program": plan.program}, options)


def _immutable(app: Celery, task: str, args: tuple[object, ...], kwargs: dict[str, object],
               options: dict[str, object]) -> Signature:
    """``app.signature(task, args, kwargs, immutable=True, **options)``, built from its mapping directly."""
    fields = {"task": task, "args": args, "kwargs": kwargs, "options": options, "subtask_type": None,
              "immutable": True}
    return Signature(fields, app=app)


def hard_time_limit(timeout_s: float) -> float:
    """When the pool process is killed: ``timeout_s`` plus a grace of ``timeout_s`` (1 to 5 s)."""
    return timeout_s + min(HARD_TIMEOUT_GRACE_S, max(1.0, timeout_s))


def advance_signature(app: Celery, execution_id: str, strategy: str, stage: int, namespace: str,
                      broker_url: str | None = None, *, errback: bool = False) -> Signature:
    """The small control task that moves an execution on to ``stage``."""
    options = {
        "queue": control_queue(namespace),
        "task_id": advance_task_id(execution_id, stage, errback=errback),
        # bookkeeping goes first
        "priority": message_priority(1.0, broker_url or broker_url_of(app)),
    }
    return _immutable(app, ADVANCE, (execution_id, strategy, stage), {}, options)


def stage_signature(
    app: Celery, plan: Plan, execution_id: str, strategy: str, stage: int, names: list[str], namespace: str
) -> Signature:
    """A chord of the stage's modules whose body advances to the next stage."""
    broker_url = broker_url_of(app)
    # A group header is taken as it is (a list would be cloned task by task).
    header = group([_module_signature(app, plan, execution_id, name, namespace, broker_url) for name in names],
                   app=app)
    body = advance_signature(app, execution_id, strategy, stage + 1, namespace, broker_url)
    # A header task that fails instead of returning (hard time limit, revoked, crashed) makes Celery
    # skip the body and call its errbacks: advancing from there too means no chord is left hanging.
    body.on_error(advance_signature(app, execution_id, strategy, stage + 1, namespace, broker_url,
                                    errback=True))
    return chord(header, body, app=app)


def compensate_signature(app: Celery, plan: Plan, execution_id: str, order: list[str], namespace: str,
                         attempt_id: str) -> Signature:
    """The task that runs the compensation of ``order[0]`` on a worker of its resource class, then sends
    the rest of ``order``; its task id ``EXEC.compensate.MODULE.ATTEMPT_ID`` (a fresh ``attempt_id`` per
    chain: a re-delivered message keeps it, a re-run gets another)."""
    options = {
        "queue": queue_name(namespace, plan.modules[order[0]].resource),
        "task_id": f"{execution_id}.compensate.{order[0]}.{attempt_id}",
        "priority": message_priority(1.0, broker_url_of(app)),
    }
    return _immutable(app, COMPENSATE, (execution_id, order), {}, options)
