"""The ``dspex-celery`` command line: a click group; each command family lives in its own module."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import click

from dspex_celery.errors import DspexError, ProgramError, UnservedResourceWarning


class DspexGroup(click.Group):
    """A click group that turns errors of the dspex tree into one line and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DspexError as exc:
            lines = exc.lines() if isinstance(exc, ProgramError) else [str(exc)]
            for line in lines:
                click.echo(f"error: {line}", err=True)
            ctx.exit(exc.exit_code)


BROKER_HELP = "Celery broker URL (default: DSPEX_BROKER_URL, else broker_url in the config file)."
RESULT_BACKEND_HELP = ("Redis URL of results and execution state (default: DSPEX_RESULT_BACKEND, "
                       "else the broker when it is Redis).")


def connection_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--broker`` and ``--result-backend`` of a command that needs a cluster."""
    return _connection_options(command, BROKER_HELP)


def in_process_connection_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--broker`` and ``--result-backend`` of a command that runs in-process without a broker."""
    return _connection_options(command, BROKER_HELP.replace(").", "; none: run in-process)."))


def _connection_options(command: Callable[..., Any], broker_help: str) -> Callable[..., Any]:
    command = click.option("--result-backend", metavar="URL", default=None, help=RESULT_BACKEND_HELP)(command)
    return click.option("--broker", metavar="URL", default=None, help=broker_help)(command)


@click.group(cls=DspexGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dspex-celery")
def cli() -> None:
    """Run DSPy-style programs (DAGs of modules) on a Celery cluster."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.showwarning = _show_warning


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
    cli(prog_name="dspex-celery")


# Command families register themselves on ``cli``.
from dspex_celery.cli import history, monitor, ops, programs, worker  # noqa: E402,F401

if __name__ == "__main__":  # pragma: no cover
    main()
