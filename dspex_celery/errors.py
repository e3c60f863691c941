"""One error tree: everything dspex-celery raises on purpose derives from :class:`DspexError`.

Errors a user can cause carry a one-line message naming the thing and the fix; the CLI prints
that line and exits with ``exit_code`` (2 for invalid input, 1 for a failed execution).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # errors is the lowest floor: it imports results for typing only
    from dspex_celery.results import ExecutionResult


def reason_of(exc: BaseException) -> str:
    """The first line of an error's message, for a one-line report (SQLAlchemy's wrapped driver error
    unwrapped; the error's type when it says nothing)."""
    text = str(getattr(exc, "orig", None) or exc)
    return text.splitlines()[0] if text else type(exc).__name__


def not_utf8(exc: UnicodeDecodeError) -> str:
    """Where a file that is not UTF-8 text first fails to decode, for a one-line report."""
    return f"not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start})"


def beyond_parser_limits(exc: BaseException) -> str | None:
    """Why JSON or YAML text could not be read when the parser hit one of Python's limits rather than a
    syntax error (nesting too deep, an integer longer than Python converts), worded for one line; else None."""
    if isinstance(exc, RecursionError):
        return "nests too deeply to parse: flatten it"
    if isinstance(exc, ValueError) and "integer string conversion" in str(exc):
        return (f"holds an integer of more than {sys.get_int_max_str_digits()} digits, more than Python "
                "converts: pass it as a string")
    return None


def imported_exceptions(paths: Iterable[str]) -> tuple[type[BaseException], ...]:
    """The exception classes ``package.module:Class`` paths name (``retry.on``, ``circuit_breaker.ignore``),
    looked up among the modules this process has already imported: an error of a module never imported
    cannot have been raised, and a plan (which anyone with queue access can forge) must not make a
    worker import a module it names. Paths that name no exception class are left out."""
    found = []
    for path in paths:
        module_path, _, attribute = path.partition(":")
        target: object = sys.modules.get(module_path)
        for part in attribute.split(".") if target is not None else ():
            if part.startswith("__"):
                target = None
                break
            target = getattr(target, part, None)
        if isinstance(target, type) and issubclass(target, BaseException):
            found.append(target)
    return tuple(found)


class DspexError(Exception):
    """Base of every error raised on purpose by dspex-celery."""

    exit_code: int = 1


# --- the user's program, inputs or settings are invalid (exit 2) -------------------------------


class UsageError(DspexError):
    """The user asked for something that cannot be done as asked."""

    exit_code = 2


class ProgramError(UsageError):
    """A program file or program definition is invalid; ``problems`` lists every problem found."""

    def __init__(self, problems: list[str], source: str = "program") -> None:
        self.problems = problems
        self.source = source
        super().__init__(f"{source}: " + "; ".join(problems))

    def lines(self) -> list[str]:
        """One line per problem, each prefixed with the source."""
        return [f"{self.source}: {problem}" for problem in self.problems]


class InputError(UsageError):
    """The inputs given to a submission do not match the program's declared inputs."""


class ConfigError(UsageError):
    """A setting (broker URL, result backend, allow-list, ...) is missing or invalid."""


class BrokerUnreachable(ConfigError):
    """The broker or result backend cannot be reached."""


class UnknownExecution(UsageError):
    """No execution with that id is known to the state store (unknown or expired)."""


class DspyMissing(UsageError):
    """The program needs ``dspy``, which is not installed (``pip install 'dspex-celery[dspy]'``)."""


# --- a module failed while running on a worker ------------------------------------------------


class ModuleError(DspexError):
    """Base of errors raised for one module run."""


class ModuleNotAllowed(ModuleError):
    """The module is outside the worker's allow-listed packages."""


class ModuleImportError(ModuleError):
    """The module's ``uses`` cannot be imported on the worker."""


class ModuleOutputError(ModuleError):
    """A module returned something that is not a JSON-able mapping."""


class ModuleInputError(ModuleError):
    """A module input refers to a field its upstream module did not return."""


class ModuleStateError(ModuleError):
    """A module's ``state:`` file is missing on the worker or cannot be loaded."""


class LMFactoryError(ModuleError):
    """A ``dspy: {lm: ...}`` (or adapter) factory cannot be imported, failed, or built no LM."""


class TransientError(ModuleError):
    """Raise from a module to ask for a retry with backoff (rate limits, flaky network, ...)."""


class ModuleTimeout(TransientError):
    """A module ran longer than its ``timeout_s`` (soft limit)."""


class CircuitOpen(ModuleError):
    """The module's circuit breaker is open: the call was not made."""


class WorkerLost(ModuleError):
    """The worker process running the module died (killed, out of memory) more often than allowed."""


class ResourceWaitAborted(ModuleError):
    """The execution ended while the module waited for a slot of its resource class."""


# --- an execution as a whole ------------------------------------------------------------------


class ExecutionTimeout(DspexError):
    """The execution did not finish within the client's timeout."""


class ExecutionFailed(DspexError):
    """The execution ended ``failed`` or ``cancelled``; ``result`` is its :class:`ExecutionResult`,
    ``message`` the one line saying why (``results.describe_failure(result)``)."""

    def __init__(self, result: ExecutionResult, message: str) -> None:
        self.result = result
        super().__init__(message)


class StateLost(DspexError):
    """The execution's state vanished from the store while it ran (Redis restarted without persistence)."""

    def __init__(self, execution_id: str) -> None:
        self.execution_id = execution_id
        super().__init__(f"execution {execution_id}: its state is gone (Redis restarted without persistence?)")

    def to_json_dict(self) -> dict[str, Any]:
        """What ``--json`` prints instead of a result."""
        return {"execution_id": self.execution_id, "status": "lost", "error": str(self)}


class StateStoreUnreachable(DspexError):
    """The state store stopped answering a waiting client for too long."""

    def __init__(self, execution_id: str, message: str) -> None:
        self.execution_id = execution_id
        super().__init__(message)

    def to_json_dict(self) -> dict[str, Any]:
        """What ``--json`` prints instead of a result."""
        return {"execution_id": self.execution_id, "status": "unknown", "error": str(self)}


# --- warnings -------------------------------------------------------------------------------------


class UnservedResourceWarning(UserWarning):
    """A submitted program needs a resource class that no live worker serves: those modules wait
    in their queue until a worker for it starts."""
