"""What the commands share: connection options, the program argument, ``--strategy``, and the one
function that builds a runtime from a command's options (:func:`open_runtime`).

Command modules import this module, never the group (``dspex_celery.cli``): the group finds the
commands by name and imports their module only when one runs or shows its help.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import click

from dspex_celery.bootstrap import create_runtime
from dspex_celery.errors import ConfigError, UsageError
from dspex_celery.runtime import Runtime
from dspex_celery.settings import Settings, load_settings
from dspex_celery.strategies.registry import STRATEGIES

BROKER_HELP = "Celery broker URL (default: DSPEX_BROKER_URL, else broker_url in the config file)."
RESULT_BACKEND_HELP = ("Redis URL of results and execution state (default: DSPEX_RESULT_BACKEND, "
                       "else the broker when it is Redis).")
NO_BROKER_FIX = "pass --broker URL or set DSPEX_BROKER_URL"

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


class Seconds(click.FloatRange):
    """A finite number of seconds in a range (click's FloatRange lets ``nan`` and ``inf`` through)."""

    name = "seconds"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        seconds = super().convert(value, param, ctx)
        if not math.isfinite(seconds):
            self.fail(f"{value!r} is not a finite number of seconds", param, ctx)
        return seconds

#: A plain string: a directory, like a missing file, is the program loader's one-line error (click's own
#: check would print a usage block).
program_argument = click.argument("program_file", metavar="PROGRAM")


def connection_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--broker`` and ``--result-backend`` of a command that needs a cluster."""
    return _connection_options(command, BROKER_HELP)


def in_process_connection_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--broker`` and ``--result-backend`` of a command that runs in-process without a broker."""
    return _connection_options(command, BROKER_HELP.replace(").", "; none: run in-process)."))


def _connection_options(command: Callable[..., Any], broker_help: str) -> Callable[..., Any]:
    command = click.option("--result-backend", metavar="URL", default=None, help=RESULT_BACKEND_HELP)(command)
    return click.option("-b", "--broker", metavar="URL", default=None, help=broker_help)(command)


def strategy_option(help_text: str) -> Decorator:
    """``--strategy NAME``, one of the execution strategies (default ``None``: the command decides)."""
    return click.option("--strategy", type=click.Choice(STRATEGIES), default=None, help=help_text)


def open_runtime(
    broker: str | None,
    result_backend: str | None,
    *,
    modules: tuple[str, ...] = (),
    cluster: str | None = None,
    check: Callable[[Settings], None] | None = None,
) -> Runtime:
    """The runtime of a command's ``--broker``/``--result-backend``/``--modules`` (else ``DSPEX_*``
    and the config file); the one place the CLI builds one.

    ``cluster``: the command needs a broker; an in-process configuration is then the error
    "``cluster``: pass --broker URL ...". ``check`` refuses settings before the runtime is built.
    """
    settings = load_settings(broker_url=broker, result_backend=result_backend, modules=",".join(modules) or None)
    if cluster is not None and settings.embedded:
        raise ConfigError(f"{cluster}: {NO_BROKER_FIX}")
    if check is not None:
        check(settings)
    return create_runtime(settings)


def refuse_modules_on_a_cluster(settings: Settings) -> None:
    """``run --modules`` restricts in-process runs only."""
    if not settings.embedded:
        raise UsageError("--modules restricts in-process runs only: on a cluster, the workers' own --modules "
                         "decide what runs (drop --modules or --broker)")


def cluster_runtime(broker: str | None, result_backend: str | None, command: str) -> Runtime:
    """A reachable runtime of a cluster, for ``command`` (these commands mean nothing in-process)."""
    runtime = open_runtime(broker, result_backend, cluster=f"{command} needs a cluster")
    runtime.check_reachable()
    return runtime
