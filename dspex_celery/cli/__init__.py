"""The ``dspex-celery`` command line: a click group whose commands are imported only when used.

:data:`COMMANDS` names each command's module and attribute and its one-line help, which
``dspex-celery --help`` lists without importing anything heavy; a command's module is imported when
it runs or shows its own help (tests/test_help.py checks the help lines are the commands' own).
A new command is a function in a module of this package plus one line in :data:`COMMANDS`.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from typing import Any, NamedTuple

import click

from dspex_celery.errors import DspexError, ProgramError, UnservedResourceWarning


class LazyCommand(NamedTuple):
    """Where a command lives (``module:attribute``) and the first line of its help."""

    target: str
    short_help: str


COMMANDS: dict[str, LazyCommand] = {
    "breakers": LazyCommand(
        "dspex_celery.cli.ops:breakers",
        "Show the circuit breakers (named PROGRAM.MODULE) that are open or have counted failures."),
    "cancel": LazyCommand(
        "dspex_celery.cli.ops:cancel",
        "Cancel an execution: revoke its pending modules, terminate the running ones (prefork workers)."),
    "compensate": LazyCommand(
        "dspex_celery.cli.compensate:compensate",
        "Run the failed compensations of an ended execution again; wait and print how they ended."),
    "flower": LazyCommand(
        "dspex_celery.cli.monitor:flower",
        "Start the Flower monitoring UI (and its /api and /metrics) on this cluster."),
    "history": LazyCommand(
        "dspex_celery.cli.history:history_command", "List recorded executions, most recent first."),
    "listener": LazyCommand(
        "dspex_celery.cli.history:listener",
        "Write execution history from the cluster's history stream (restart-safe, idempotent)."),
    "optimize": LazyCommand(
        "dspex_celery.cli.history:optimize_command",
        "Analyse PROGRAM's history; save the profile its next runs use."),
    "ping": LazyCommand(
        "dspex_celery.cli.health:ping",
        "Exit 0 when a worker (or --listener) of this deployment on this host answers; 1 when none does."),
    "plan": LazyCommand(
        "dspex_celery.cli.programs:plan", "Show how PROGRAM would run: levels, width, critical path."),
    "report": LazyCommand(
        "dspex_celery.cli.monitor:report",
        "Write a self-contained HTML report of an execution: timeline, critical path, durations."),
    "resources": LazyCommand(
        "dspex_celery.cli.monitor:resources",
        "Show resource-class limits (and any a 429 lowered), who holds a slot now, and utilization."),
    "resume": LazyCommand(
        "dspex_celery.cli.ops:resume",
        "Run an ended execution again, reusing the outputs of its succeeded modules."),
    "run": LazyCommand(
        "dspex_celery.cli.programs:run",
        "Run PROGRAM and print its outputs (in-process when no broker is configured)."),
    "show": LazyCommand(
        "dspex_celery.cli.history:show",
        "Show a recorded execution: status, outputs and one row per module (--json: as run --json)."),
    "status": LazyCommand(
        "dspex_celery.cli.history:status",
        "Live executions, queue depths per resource class, and the workers that serve them."),
    "validate": LazyCommand(
        "dspex_celery.cli.programs:validate",
        "Check PROGRAM: schema, references, cycles, and that every module imports and takes its inputs."),
    "worker": LazyCommand(
        "dspex_celery.cli.worker:worker", "Start a worker consuming the queues of its resource classes."),
}


class DspexGroup(click.Group):
    """A click group of lazily imported commands that turns errors of the dspex tree into one line
    and an exit code."""

    def __init__(self, *args: Any, lazy_commands: dict[str, LazyCommand] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_commands = dict(lazy_commands or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *self.lazy_commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in self.lazy_commands:
            self.add_command(load_command(self.lazy_commands[cmd_name].target), cmd_name)
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The commands and their help lines as click lists them, importing none not loaded yet."""
        commands = [(name, self.commands.get(name) or self._help_stub(name)) for name in self.list_commands(ctx)]
        shown = [(name, command) for name, command in commands if not command.hidden]
        if not shown:
            return
        limit = formatter.width - 6 - max(len(name) for name, _ in shown)
        with formatter.section("Commands"):
            formatter.write_dl([(name, command.get_short_help_str(limit)) for name, command in shown])

    def _help_stub(self, name: str) -> click.Command:
        """A stand-in that has only the help line of the lazy command ``name``."""
        return click.Command(name, help=self.lazy_commands[name].short_help)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DspexError as exc:
            lines = exc.lines() if isinstance(exc, ProgramError) else [str(exc)]
            for line in lines:
                click.echo(f"error: {line}", err=True)
            ctx.exit(exc.exit_code)


def load_command(target: str) -> click.Command:
    """The click command at ``module:attribute``."""
    module, _, attribute = target.partition(":")
    command = getattr(importlib.import_module(module), attribute)
    if not isinstance(command, click.Command):
        raise TypeError(f"{target} is not a click command")
    return command


#: The group's connection options and the setting each stands for (as ``celery -b`` sets CELERY_BROKER_URL).
GROUP_SETTINGS = {"broker": "DSPEX_BROKER_URL", "result_backend": "DSPEX_RESULT_BACKEND", "config": "DSPEX_CONFIG"}


@click.group(cls=DspexGroup, lazy_commands=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-b", "--broker", metavar="URL", default=None,
              help="Celery broker URL for the command (as DSPEX_BROKER_URL; its own --broker wins).")
@click.option("--result-backend", metavar="URL", default=None,
              help="Redis URL of results and execution state (as DSPEX_RESULT_BACKEND; the command's own wins).")
@click.option("--config", metavar="FILE", type=click.Path(exists=True, dir_okay=False), default=None,
              help="YAML config file (as DSPEX_CONFIG; default: config/dspex.yaml).")
@click.version_option(package_name="dspex-celery")
@click.pass_context
def cli(ctx: click.Context, broker: str | None, result_backend: str | None, config: str | None) -> None:
    """Run DSPy-style programs (DAGs of modules) on a Celery cluster."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.showwarning = _show_warning
    given = {"broker": broker, "result_backend": result_backend, "config": config}
    ctx.with_resource(environment({GROUP_SETTINGS[name]: value for name, value in given.items() if value is not None}))


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """``values`` in ``os.environ`` while the command runs (its subprocesses inherit them), as before after."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


_python_showwarning = warnings.showwarning


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    """The engine's warnings as one ``warning: ...`` line on stderr; others as Python shows them."""
    if issubclass(category, UnservedResourceWarning):
        click.echo(f"warning: {message}", err=True)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


def main() -> None:
    """Console-script entry point."""
    try:
        cli(prog_name="dspex-celery")
    except SystemExit as done:
        embedded = sys.modules.get("dspex_celery.embedded")  # only an embedded run can leave calls behind
        if embedded is not None:
            embedded.exit_leaving_abandoned_calls(done.code if isinstance(done.code, int) else 1)
        raise
    finally:
        # The command is done: spare the exit a last garbage collection of everything the process made
        # (~0.25 s after an embedded run). Exit handlers, flushes and finalizers run as before; the
        # operating system takes the memory back.
        gc.freeze()


if __name__ == "__main__":  # pragma: no cover
    main()
