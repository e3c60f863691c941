"""``dspex-celery worker``: a Celery worker for some resource classes and allow-listed packages."""

from __future__ import annotations

import gc
import importlib
import logging
import os
import re
import sys
from typing import Any

import click
from celery.exceptions import ChordError, TaskRevokedError
from celery.signals import task_postrun, worker_init, worker_process_init, worker_ready
from celery.utils.nodenames import default_nodename, host_format

from dspex_celery import defaults
from dspex_celery.cli.options import connection_options, open_runtime
from dspex_celery.errors import ConfigError, UsageError
from dspex_celery.metrics_endpoint import prepare_metrics_dir, serve_metrics
from dspex_celery.presence import answers_as, keep_announced
from dspex_celery.routing import worker_queues
from dspex_celery.runtime import Runtime
from dspex_celery.settings import Settings
from dspex_celery.spec import NAME_PATTERN

logger = logging.getLogger(__name__)


def import_allowed(packages: tuple[str, ...]) -> None:
    """Import every allow-listed package now, so a typo fails at start and not per module."""
    if not packages:
        raise ConfigError(
            "no allow-listed module packages: pass --modules PKG (repeatable) or set DSPEX_MODULES"
        )
    for package in packages:
        try:
            importlib.import_module(package)
        except ImportError as exc:
            raise ConfigError(f"cannot import allow-listed package '{package}' ({exc}): fix --modules") from None


def import_includes(modules: tuple[str, ...]) -> None:
    """Import extra task modules; call after the app exists so their ``@shared_task``s bind to it."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ConfigError(f"cannot import task module '{module}' ({exc}): fix --include") from None


def freeze_startup_heap(**_: Any) -> None:
    """Put what start-up built (modules, classes, the app) out of the cyclic garbage collector's reach, so
    a full collection walks only what the tasks made since: with DSPy loaded, a full collection of the
    whole heap holds the GIL ~0.1 s, stalling every thread of the worker. Garbage first, so none is kept."""
    gc.collect()
    gc.freeze()


def freeze_after_first_task(**_: Any) -> None:
    """Once, after this process's first task: what its modules imported (DSPy, an LM client) joins the
    frozen start-up heap."""
    task_postrun.disconnect(freeze_after_first_task)
    freeze_startup_heap()


#: The logger of Celery's Redis result backend (it reports a chord whose member failed).
CELERY_REDIS_BACKEND_LOGGER = "celery.backends.redis"


class CancelledStageNote(logging.Filter):
    """Celery's Redis backend logs a chord whose member was revoked as an ERROR with a traceback;
    a ``levels`` stage whose modules a cancel terminated is not an error: one INFO line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if not (isinstance(error, ChordError) and isinstance(error.__cause__, TaskRevokedError)):
            return True
        record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
        record.msg, record.args = "levels stage ended by a revoke (a cancel): %s", (error,)
        record.exc_info = record.exc_text = None
        return logging.getLogger(record.name).isEnabledFor(logging.INFO)


def resource_classes(given: tuple[str, ...]) -> tuple[str, ...]:
    """The resource classes ``--resource`` names (``--resource io,llm`` is two, as ``celery -Q a,b``);
    each must be a class name a program can give, or the worker would consume a queue no module is sent to
    (``io,llm`` joined into Celery's ``--queues`` would consume a bare ``llm`` queue outside the namespace)."""
    classes = tuple(dict.fromkeys(part.strip() for value in given for part in value.split(",") if part.strip()))
    for name in classes:
        if not re.match(NAME_PATTERN, name):
            raise ConfigError(f"--resource '{name}' is not a resource class name (letters, digits and _, "
                              "not starting with a digit): fix --resource (or DSPEX_WORKER_RESOURCES)")
    if given and not classes:
        raise ConfigError("--resource is empty: name a resource class (or leave it out for 'default')")
    return classes or (defaults.RESOURCE,)


def calls_cannot_be_terminated() -> None:
    """On a threads or solo pool, let ``revoke(terminate=True)`` (``cancel``, a strict failure, a timeout)
    leave running calls alone quietly: Celery's pools there raise ``NotImplementedError`` from
    ``terminate_job``, which the remote-control command logs as an ERROR with a traceback per cancel and
    which stops it before the other running modules of the same revoke. The call cannot be stopped there
    (README: its outcome is ignored); the task stays in the revoked set as before."""
    from celery.concurrency.base import BasePool
    from celery.worker.request import Request

    original = Request.terminate
    if getattr(original, "dspex_quiet", False):
        return

    def terminate(self: Request, pool: Any, signal: Any = None) -> None:
        if type(pool).terminate_job is BasePool.terminate_job:  # this pool cannot stop a running call
            logger.info("cannot stop the running call of %s on a %s pool: its outcome is ignored",
                        self.id, type(pool).__module__.rsplit(".", 1)[-1])
            return
        original(self, pool, signal)

    terminate.dspex_quiet = True  # type: ignore[attr-defined]
    Request.terminate = terminate


def node_name(resources: tuple[str, ...], name: str | None) -> str:
    """A node name that tells workers apart: resource classes, pid and host."""
    return name or f"dspex-{'+'.join(resources)}-{os.getpid()}@%h"


def refuse_a_taken_name(runtime: Runtime, name: str | None) -> None:
    """Refuse ``-n NAME`` while a worker of that name is up in this namespace: the two would share one
    presence entry (the first to stop withdraws the other) and Celery's replies to the name."""
    if name is None:  # the default name holds this process's pid
        return
    node = host_format(default_nodename(name))
    if answers_as(runtime, node):
        raise UsageError(f"a worker named '{node}' is already up in namespace '{runtime.settings.namespace}': "
                         "give this one another name (-n NAME), or stop that one first")


def worker_argv(settings: Settings, resources: tuple[str, ...], concurrency: int | None, pool: str,
                name: str | None, loglevel: str, task_events: bool = False) -> list[str]:
    """Arguments for Celery's own worker command."""
    argv = [
        "worker",
        "--queues", ",".join(worker_queues(settings.namespace, list(resources))),
        "--pool", pool,
        "--hostname", node_name(resources, name),
        "--loglevel", loglevel,
        "--without-gossip",
        "--without-mingle",
    ]
    if task_events:
        argv.append("--task-events")
    if concurrency is not None:
        argv += ["--concurrency", str(concurrency)]
    return argv


@click.command()
@click.option("--resource", "resources", multiple=True, metavar="CLASS", envvar="DSPEX_WORKER_RESOURCES",
              help=f"Resource class to serve (repeatable; default: {defaults.RESOURCE}).")
@click.option("-c", "--concurrency", type=click.IntRange(min=1), default=None, envvar="DSPEX_WORKER_CONCURRENCY",
              help="Pool processes or threads (default: one per CPU).")
@click.option("-P", "--pool", type=click.Choice(["prefork", "threads", "solo"]), default="prefork",
              envvar="DSPEX_WORKER_POOL",
              show_default=True, help="Execution pool (time limits need prefork).")
@click.option("-m", "--modules", multiple=True, metavar="PKG",
              help="Allow-listed package whose modules this worker may run (repeatable; or DSPEX_MODULES).")
@click.option("-I", "--include", "includes", multiple=True, metavar="MODULE",
              help="Extra Celery task module to import at start (repeatable), e.g. plain @shared_task tasks.")
@connection_options
@click.option("-n", "--name", default=None, help="Node name (default: dspex-CLASSES-PID@HOST).")
@click.option("-l", "--loglevel", default="INFO", show_default=True, help="DEBUG, INFO, WARNING or ERROR.")
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=None, envvar="DSPEX_METRICS_PORT",
              help="Serve Prometheus metrics (module durations, attempts, failures, queue waits, breakers, "
                   "resource slots) on this port.")
@click.option("--metrics-address", default="127.0.0.1", show_default=True, envvar="DSPEX_METRICS_ADDRESS",
              help="Address the metrics endpoint binds (0.0.0.0 for a scraper on another host).")
@click.option("-E", "--task-events", is_flag=True, envvar="DSPEX_WORKER_TASK_EVENTS",
              help="Send task events from the start (as celery worker -E); Flower turns them on when it runs.")
def worker(
    resources: tuple[str, ...],
    concurrency: int | None,
    pool: str,
    modules: tuple[str, ...],
    includes: tuple[str, ...],
    broker: str | None,
    result_backend: str | None,
    name: str | None,
    loglevel: str,
    task_events: bool,
    metrics_port: int | None,
    metrics_address: str,
) -> None:
    """Start a worker consuming the queues of its resource classes."""
    resources = resource_classes(resources)
    if metrics_port is not None:
        prepare_metrics_dir()  # before the pool forks and before prometheus_client is imported
    runtime = open_runtime(broker, result_backend, modules=modules, cluster="a worker needs a broker",
                           check=import_project_modules)
    import_includes(includes)
    runtime.check_reachable()
    refuse_a_taken_name(runtime, name)
    keep_announced(runtime, resources)
    if metrics_port is not None:
        serve_metrics(runtime, metrics_port, metrics_address)
    if pool in ("threads", "solo"):
        calls_cannot_be_terminated()
    logging.getLogger(CELERY_REDIS_BACKEND_LOGGER).addFilter(CancelledStageNote())
    worker_ready.connect(freeze_startup_heap, weak=False)  # the process that runs tasks (threads, solo)
    worker_process_init.connect(freeze_startup_heap, weak=False)  # each prefork pool process
    task_postrun.connect(freeze_after_first_task, weak=False)
    raise SystemExit(run_worker(runtime, worker_argv(runtime.settings, resources, concurrency, pool, name,
                                                     loglevel, task_events)))


def run_worker(runtime: Runtime, argv: list[str]) -> int:
    """Run Celery's worker command; return the worker's own exit code, which Celery's
    ``worker_main`` drops (a worker stopped by an unrecoverable error — a lost broker, a failing
    bootstep — would exit 0, and a supervisor that restarts on failure would not restart it)."""
    controllers: list[Any] = []

    def remember(sender: Any, **_: Any) -> None:
        controllers.append(sender)

    worker_init.connect(remember, weak=False)
    try:
        runtime.app.worker_main(argv)
    finally:
        worker_init.disconnect(remember)
    return int(controllers[-1].exitcode or 0) if controllers else 0


def import_project_modules(settings: Settings) -> None:
    """Import the allow-listed packages from the cwd too (like the celery command), before the app exists."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    import_allowed(settings.allowed_packages)
