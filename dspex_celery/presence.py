"""Which workers are up, and which resource classes they serve.

Every ``dspex-celery worker`` announces itself in the ``{namespace}:workers`` hash (node name ->
resource classes and the time it was last seen) when it is ready, again every
:data:`HEARTBEAT_S`, and withdraws on shutdown. A worker not seen for :data:`STALE_AFTER_S` (killed,
machine gone) no longer counts. Clients use it to say at once that a module will wait because no
worker serves its resource class — Celery would otherwise leave its message queued, silently.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import warnings
from collections.abc import Iterable
from typing import Any

from celery.signals import worker_ready, worker_shutdown

from dspex_celery.errors import UnservedResourceWarning
from dspex_celery.plan import Plan
from dspex_celery.runtime import Runtime

log = logging.getLogger(__name__)

HEARTBEAT_S = 10.0
STALE_AFTER_S = 3 * HEARTBEAT_S
WORKERS = "workers"


def announce(runtime: Runtime, node: str, resources: Iterable[str], slots: int | None = None) -> None:
    """Record that ``node`` is up and serves ``resources`` (now) with ``slots`` pool slots (the resource
    limiter starts an unconfigured class's 429-adaptive limit from the slots serving it)."""
    key = runtime.store.global_key(WORKERS)
    entry = json.dumps({"resources": sorted(resources), "seen": time.time(), "slots": slots})
    runtime.store.client.pipeline().hset(key, node, entry).expire(key, round(STALE_AFTER_S)).execute()


def withdraw(runtime: Runtime, node: str) -> None:
    runtime.store.client.hdel(runtime.store.global_key(WORKERS), node)


def answers_as(runtime: Runtime, node: str, timeout: float = 1.0) -> bool:
    """Whether a worker named ``node`` is up now: seen lately, and it answers a ping (an entry of a
    worker that was just killed is still fresh, and a restart under the same name must not be refused)."""
    entry = runtime.store.client.hget(runtime.store.global_key(WORKERS), node)
    if entry is None or not seen_lately(json.loads(entry), time.time()):
        return False
    return bool(runtime.app.control.ping(destination=[node], timeout=timeout))


def live_workers(runtime: Runtime) -> dict[str, list[str]]:
    """Node name -> resource classes of every worker seen in the last :data:`STALE_AFTER_S`."""
    raw = runtime.store.client.hgetall(runtime.store.global_key(WORKERS))
    now = time.time()
    workers = {node: json.loads(entry) for node, entry in raw.items()}
    return {node: entry["resources"] for node, entry in sorted(workers.items()) if seen_lately(entry, now)}


def seen_lately(entry: dict[str, Any], now: float) -> bool:
    """Whether a presence entry was announced within :data:`STALE_AFTER_S` of ``now``."""
    return now - float(entry["seen"]) < STALE_AFTER_S


def unserved(runtime: Runtime, plan: Plan) -> dict[str, list[str]]:
    """Resource class -> the plan's modules of that class that no live worker serves (none embedded)."""
    if runtime.settings.embedded:
        return {}
    served = {resource for resources in live_workers(runtime).values() for resource in resources}
    missing: dict[str, list[str]] = {}
    for name, module in plan.modules.items():
        if module.resource not in served:
            missing.setdefault(module.resource, []).append(name)
    return missing


def unserved_warning(missing: dict[str, list[str]]) -> str:
    """One line naming the resource classes without a worker and how to start one."""
    classes = ", ".join(f"'{resource}' (modules {', '.join(names)})" for resource, names in sorted(missing.items()))
    flags = " ".join(f"--resource {resource}" for resource in sorted(missing))
    return (f"no live worker serves resource class {classes}: those modules wait in their queue until one "
            f"starts (dspex-celery worker {flags})")


def warn_if_unserved(runtime: Runtime, plan: Plan) -> None:
    """An :class:`UnservedResourceWarning` (for the caller of ``submit_program``/``submit_batch``)
    when a resource class of ``plan`` has no live worker."""
    missing = unserved(runtime, plan)
    if missing:
        warnings.warn(UnservedResourceWarning(unserved_warning(missing)), stacklevel=3)


def keep_announced(runtime: Runtime, resources: Iterable[str]) -> None:
    """Connect this worker process to the registry: announce when ready, every heartbeat, withdraw at shutdown."""
    served = tuple(resources)
    stop = threading.Event()

    def beat(node: str, slots: int | None) -> None:
        while not stop.wait(HEARTBEAT_S):
            try:
                announce(runtime, node, served, slots)
            except Exception:  # a Redis hiccup must not end the heartbeat; the next beat retries
                log.warning("could not announce worker %s", node, exc_info=True)

    @worker_ready.connect(weak=False)
    def _ready(sender: object = None, **_: object) -> None:
        node = str(getattr(sender, "hostname", ""))
        slots = getattr(getattr(sender, "controller", None), "concurrency", None)
        slots = slots if isinstance(slots, int) else None
        announce(runtime, node, served, slots)
        threading.Thread(target=beat, args=(node, slots), name="dspex-presence", daemon=True).start()

        @worker_shutdown.connect(weak=False)
        def _shutdown(**_: object) -> None:
            stop.set()
            try:
                withdraw(runtime, node)
            except Exception:  # the store may be gone already; the entry goes stale by itself
                log.warning("could not withdraw worker %s", node, exc_info=True)
