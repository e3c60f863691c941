"""The worker's consumer: a task message Celery cannot take in is dropped, not fatal.

Celery's consumer reports the bodies it cannot decode and content types it does not accept in
many lines (its tracebacks, the body), and an error while it turns a message into a request (a
task message without an ``id`` header, ...) raises out of its event loop, and the worker stops for
good (on any broker). Such a message is rejected here (RabbitMQ discards it, or dead-letters it
when its queue has a dead-letter exchange) with one error line naming the queue and the reason;
the worker goes on. Selected by Celery's ``worker_consumer`` setting, so only workers import it.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Mapping
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer
from kombu.exceptions import MessageStateError
from kombu.message import Message

from dspex_celery.transport import describe

log = logging.getLogger(__name__)

#: Task headers Celery's result backend and canvas use as they are: a string or None each.
_TEXT_HEADERS = ("root_id", "parent_id", "group", "shadow", "origin", "argsrepr", "kwargsrepr")
#: Other task headers used unchecked, with the types they must have when present (None allowed).
_TYPED_HEADERS: tuple[tuple[str, type | tuple[type, ...]], ...] = (
    ("stamps", dict), ("stamped_headers", list), ("group_index", int), ("retries", int),
    ("timelimit", (list, tuple)), ("replaced_task_nesting", int),
)
#: Nested signatures a canvas signature's kwargs may hold (group, chain and chord signatures).
_NESTED_KWARGS = ("tasks", "header", "body")
#: How deep a forged message's canvas may nest before it is refused.
_MAX_CANVAS_DEPTH = 32


def arguments_problem(tasks: Mapping[str, Any], name: Any, args: Any, kwargs: Any) -> str | None:
    """Why the arguments a message carries do not fit the task it names (a forged message: the task
    would fail with a TypeError and its traceback), or None; Celery reports an unknown task itself."""
    task = tasks.get(name) if isinstance(name, str) else None
    if task is None:
        return None
    if not isinstance(args, list | tuple) or not isinstance(kwargs, dict):
        return f"its arguments are a {type(args).__name__} and a {type(kwargs).__name__}, not a list and a mapping"
    try:
        _signature_of(task).bind(*args, **kwargs)
    except TypeError as exc:
        return f"its arguments do not fit task {name} ({exc})"
    return None


@functools.lru_cache(maxsize=256)
def _signature_of(task: Any) -> inspect.Signature:
    return inspect.signature(task.run)  # through Celery's autoretry wrapper (functools.wraps)


def request_problem(message: Message, tasks: Mapping[str, Any] | None = None) -> str | None:
    """Why Celery would fail on ``message`` after taking it in, or None.

    Celery stores results and calls errbacks and chord callbacks with what a message carries: a task id
    that is no string, ``stamps`` that are no mapping or errbacks that are no signatures raise
    outside the task, after the message was taken in and before it is acknowledged. Such a message holds
    its worker slot (and prefetch) for good; a few of them stop the worker. What only a call can tell
    (an errback's arguments) is caught around the result backend (``app._message_errors_logged``).
    """
    headers = message.headers or {}
    if "task" not in headers:  # protocol 1: Celery converts (and checks) it itself
        return None
    if "id" in headers and not (isinstance(headers["id"], str) and headers["id"]):
        return f"its id header is {headers['id']!r}, not a task id"
    for field in _TEXT_HEADERS:
        if not isinstance(headers.get(field), str | None):
            return f"its {field} header is a {type(headers[field]).__name__}, not a string"
    for field, kind in _TYPED_HEADERS:
        value = headers.get(field)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            return f"its {field} header is a {type(value).__name__}"
    try:
        body = message.decode()
    except Exception as exc:  # a content type it does not accept (pickle), a body it cannot decode
        return f"its body cannot be taken in ({type(exc).__name__}: {exc})"
    if not isinstance(body, list | tuple) or len(body) != 3 or body[2] is None:
        return None  # Celery's own unpacking reports a body of another shape
    if tasks is not None and (problem := arguments_problem(tasks, headers["task"], body[0], body[1])):
        return problem
    embed = body[2]
    if not isinstance(embed, dict) or not all(isinstance(key, str) for key in embed):
        return "its body's options are not a mapping of names"
    for field in ("callbacks", "errbacks", "chain"):
        value = embed.get(field)
        if value is not None:
            if not isinstance(value, list):
                return f"its {field} are a {type(value).__name__}, not a list"
            for signature in value:
                problem = _signature_problem(signature, 0)
                if problem:
                    return f"its {field}: {problem}"
    if embed.get("chord") is not None:
        problem = _signature_problem(embed["chord"], 0)
        if problem:
            return f"its chord: {problem}"
        if not (isinstance(headers.get("group"), str) and headers["group"]):
            return "it has a chord callback but no group"
    return None


def _signature_problem(signature: Any, depth: int) -> str | None:
    """Why ``signature`` (a canvas signature as a message carries it) is not one Celery can call."""
    if depth > _MAX_CANVAS_DEPTH:
        return "it nests too deep"
    if not isinstance(signature, dict):
        return f"a signature is a {type(signature).__name__}, not a mapping"
    name = signature.get("task")
    if not isinstance(name, str) or not name:
        return f"a signature names the task {name!r}"
    for field, kind in (("args", list | tuple), ("kwargs", dict), ("options", dict)):
        if not isinstance(signature.get(field), kind | None):
            return f"the {field} of a {name} signature are a {type(signature[field]).__name__}"
    nested: list[Any] = []
    for field in _NESTED_KWARGS if signature.get("subtask_type") else ():  # a plain task's kwargs are its own
        value = (signature.get("kwargs") or {}).get(field)
        if value is not None:
            nested += value if isinstance(value, list | tuple) else [value]
    for field in ("link", "link_error"):
        value = (signature.get("options") or {}).get(field)
        if value is not None:
            nested += value if isinstance(value, list | tuple) else [value]
    for inner in nested:
        problem = _signature_problem(inner, depth + 1)
        if problem:
            return problem
    return None


class Consumer(CeleryConsumer):
    """Celery's consumer, whose task handler drops a message it fails on instead of raising."""

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Callable[[Message], Any]:
        on_task_received = super().create_task_handler(*args, **kwargs)

        def guarded(message: Message) -> Any:
            problem = request_problem(message, self.app.tasks)
            if problem is not None:
                self.drop(message, problem)
                return None
            try:
                return on_task_received(message)
            except Exception as exc:
                if self.is_broker_error(exc):
                    raise  # the consumer reconnects
                self.drop(message, exc)
                return None

        return guarded

    def is_broker_error(self, error: Exception) -> bool:
        """True for an error of the broker connection. kombu's Redis transport counts any ``KeyError``
        as one (a stale socket's channel); one raised while a message is taken in is the message's."""
        errors = (*self.connection_errors, *self.channel_errors)
        return isinstance(error, errors) and not isinstance(error, KeyError)

    def drop(self, message: Message, error: Exception | str) -> None:
        """Reject ``message`` (it does not come back) with an error line (``error``: what Celery raised,
        or why :func:`request_problem` refused it)."""
        queue = (message.delivery_info or {}).get("routing_key", "?")
        reason = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        log.error("dropped a message from queue %s: Celery cannot take it in (%s); its headers were %s, "
                  "its body %s", queue, reason, message.headers, describe(message.body))
        try:
            message.reject_log_error(log, self.connection_errors)
        except MessageStateError:  # acknowledged or rejected already
            pass
