"""The embedded worker: a Celery worker on the memory transport, in a thread of this process.

It consumes the same tasks from the same canvas as a cluster worker; it exists so that
``dspex-celery run`` works with no server at all. It trusts the program it is given (its packages
are allowed) unless an allow-list is configured (``run --modules``, ``DSPEX_MODULES``).
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Protocol

from celery import Celery
from celery._state import _set_task_join_will_block
from celery.app import trace
from celery.worker import WorkController

from dspex_celery.errors import ConfigError, ProgramError
from dspex_celery.graph import UsesRefused, is_allowed, package_of, resolve_uses
from dspex_celery.integrations.dspy_plan import dspy_factories

if TYPE_CHECKING:
    from dspex_celery.plan import Plan
    from dspex_celery.settings import Settings

START_TIMEOUT_S = 30.0
EMBEDDED_HOSTNAME = "embedded@localhost"


class _ReadyWorker(WorkController):
    """A WorkController that signals when its consumer is ready."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.ready = threading.Event()
        super().__init__(*args, **kwargs)

    def on_consumer_ready(self, consumer: object) -> None:
        self.ready.set()


class EmbeddedWorker:
    """An in-process worker that can grow the set of queues it consumes."""

    def __init__(self, app: Celery, queues: list[str], concurrency: int) -> None:
        self.app = app
        self.queues = set(queues)
        self.lock = threading.Lock()
        # Trace tasks with this app's registry (the CLI worker does the same at start-up).
        trace.setup_worker_optimizations(app, EMBEDDED_HOSTNAME)
        self.controller = _ReadyWorker(
            app=app,
            hostname=EMBEDDED_HOSTNAME,
            pool_cls="threads",
            concurrency=concurrency,
            queues=sorted(self.queues),
            loglevel="WARNING",
            without_heartbeat=True,
            without_mingle=True,
            without_gossip=True,
            task_events=False,
        )
        self.thread = threading.Thread(target=self.controller.start, name="dspex-embedded-worker", daemon=True)
        self.thread.start()
        if not self.controller.ready.wait(START_TIMEOUT_S):
            raise ConfigError("the embedded worker did not start within 30 s")
        # Starting a pool marks the whole process as "inside a worker", which would make every
        # later result.get() of the caller refuse to block; the caller is not a task.
        _set_task_join_will_block(False)
        before_thread_shutdown(self.stop)

    def consume(self, queues: list[str]) -> None:
        """Make sure the worker consumes ``queues`` (new resource classes of a new program)."""
        with self.lock:
            for queue in queues:
                if queue not in self.queues:
                    self.controller.consumer.add_task_queue(queue)
                    self.queues.add(queue)

    def stop(self, join: bool = False) -> None:
        """Stop consuming; ``join`` waits for the consumer loop to end (up to its 2 s poll)."""
        if self.thread.is_alive():
            self.controller.stop(in_sighandler=False)
            if join:
                self.thread.join(timeout=5)


#: Set when an interrupted command cancelled embedded executions: the calls still running in this
#: process have outcomes nobody reads, and the exit need not wait for them.
_calls_abandoned = threading.Event()


def abandon_running_calls() -> None:
    """The running module calls of this process's embedded worker are to be left behind at exit (a
    thread cannot be stopped: Python would otherwise wait for each to return)."""
    _calls_abandoned.set()


def exit_leaving_abandoned_calls(code: int) -> None:
    """When :func:`abandon_running_calls` was called: run the exit handlers (the history's last
    writes among them), then end the process without joining the threads that still run calls."""
    if not _calls_abandoned.is_set():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    os._exit(code)


def before_thread_shutdown(callback: Callable[[], None]) -> None:
    """Call ``callback`` at interpreter exit before thread pools shut down (``atexit`` is too late).

    At exit Python first stops every ``concurrent.futures`` thread pool (Celery's thread pool is
    one), then runs ``atexit`` callbacks: a worker stopped from ``atexit`` can still take a message
    off its queue meanwhile, and its dead pool fails it with ``cannot schedule new futures after
    shutdown``. Callbacks registered here run first (CPython's hook for exactly this, 3.9+).
    """
    register = getattr(threading, "_register_atexit", None)
    if register is None:  # not CPython
        atexit.register(callback)
    else:
        register(callback)


class Trusting(Protocol):
    """What :func:`allow_program` needs of a runtime: its settings and the packages it allows."""

    settings: Settings
    allowed: set[str]


def allow_program(runtime: Trusting, packages: Iterable[str], plan: Plan) -> None:
    """Embedded runs trust the program they are given: the top-level packages it imports from are
    allowed. With an allow-list configured (``run --modules``, ``DSPEX_MODULES``) only that is, and
    ``plan`` is checked against it now (a :class:`ProgramError` naming each refused ``uses``)."""
    configured = runtime.settings.allowed_packages
    if not configured:
        runtime.allowed |= {package.partition(".")[0] for package in packages}
        return
    problems = [problem for module in plan.modules.values()
                for uses in (module.uses, *dspy_factories(module.dspy))
                if (problem := _refused(module.name, uses, configured))]
    if problems:
        raise ProgramError(problems, f"program '{plan.program}'")


def _refused(name: str, uses: str, allowed: tuple[str, ...]) -> str | None:
    """Why module ``name`` may not run ``uses`` with the allow-list ``allowed`` (None: it may)."""
    if not is_allowed(uses, allowed):
        return (f"module '{name}': '{uses}' is outside the allow-list ({', '.join(allowed)}): "
                f"add --modules {package_of(uses)} if you trust that module")
    try:
        resolve_uses(uses, allowed)
    except UsesRefused as exc:
        return f"module '{name}': '{uses}' is not allowed ({exc})"
    except ImportError:
        return None  # validation reports it
    return None
