"""asyncio API of an ``ExecutionHandle``: ``await handle``, ``handle.get_async()``, ``handle.watch()``.

Waiting handles of one event loop share one Redis pub/sub connection (:class:`ResultHub`), so a
thousand awaited executions cost one connection and no thread. The checks a waiting client makes
every :data:`~dspex_celery.client.STATE_CHECK_S` (state still there, an abandoned finish to publish)
run on the loop's default executor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import redis
import redis.asyncio
from celery.backends.redis import RedisBackend

from dspex_celery import defaults
from dspex_celery.errors import ExecutionFailed, ExecutionTimeout
from dspex_celery.execution import Execution, timeout_message
from dspex_celery.results import ExecutionResult, ExecutionStatus, ModuleRecord, describe_failure

if TYPE_CHECKING:
    from dspex_celery.client import ExecutionHandle

T = TypeVar("T")
log = logging.getLogger(__name__)

#: Seconds between two reads of an execution's records by :func:`watch`.
WATCH_POLL_S = 0.25


class RecordUpdate(NamedTuple):
    """A module record as :func:`watch` saw it change."""

    module: str
    record: ModuleRecord


async def get_async(handle: ExecutionHandle, timeout: float | None = None, propagate: bool = True) -> ExecutionResult:
    """What ``handle.get(timeout, propagate)`` returns or raises, awaited."""
    try:
        result = await _wait(handle, timeout)
    except redis.RedisError as exc:
        raise handle.unreachable(exc) from None
    if propagate and result.status in (ExecutionStatus.FAILED, ExecutionStatus.CANCELLED):
        raise ExecutionFailed(result, describe_failure(result))
    return result


async def _wait(handle: ExecutionHandle, timeout: float | None) -> ExecutionResult:
    from dspex_celery.client import ENDED_WAIT_S  # here: the client imports this module at its top

    result = await _published(handle, timeout if timeout is not None else handle.remaining())
    if result is not None:
        return result
    if timeout is not None:
        raise ExecutionTimeout(f"execution {handle.execution_id} did not finish within {timeout:g} s")
    await _off_loop(handle.check_state)
    await _off_loop(lambda: Execution(handle.runtime, handle.execution_id).finish(
        ExecutionStatus.FAILED, timeout_message(handle.timeout)))
    result = await _published(handle, ENDED_WAIT_S)
    if result is None:
        raise ExecutionTimeout(f"execution {handle.execution_id} did not publish its result")
    return result


async def _published(handle: ExecutionHandle, seconds: float | None) -> ExecutionResult | None:
    """The published result, or None after ``seconds``; checks the state every STATE_CHECK_S."""
    from dspex_celery.client import STATE_CHECK_S, ResultWaiter  # here: see _wait

    waiter = ResultWaiter(handle)
    give_up = None if seconds is None else time.monotonic() + seconds
    hub = ResultHub.of(waiter.backend) if _has_pubsub(waiter.backend) else None
    async with contextlib.AsyncExitStack() as stack:
        queue = await stack.enter_async_context(hub.subscribed(waiter.key)) if hub is not None else None
        while True:
            data = await _off_loop(waiter.check)  # published meanwhile? else state there, abandoned finish
            if data is not None:
                return ExecutionResult.model_validate(data)
            left = None if give_up is None else give_up - time.monotonic()
            if left is not None and left <= 0:
                return None
            pause = STATE_CHECK_S if left is None else min(STATE_CHECK_S, left)
            if queue is None:  # embedded runs have no pub/sub: poll
                await asyncio.sleep(min(pause, defaults.EMBEDDED_POLL_S * 2))
                continue
            raw = await _next(queue, pause)
            data = waiter.decode(raw) if raw is not None else None
            if data is not None:
                return ExecutionResult.model_validate(data)


def _has_pubsub(backend: Any) -> bool:
    """A plain Redis result backend (Sentinel, Cluster and embedded ones are polled)."""
    return isinstance(backend, RedisBackend) and str(backend.url or "").startswith(("redis://", "rediss://", "unix://"))


async def _next(queue: asyncio.Queue[bytes], seconds: float) -> bytes | None:
    """The next message of a subscriber's queue, or None after ``seconds``."""
    try:
        return await asyncio.wait_for(queue.get(), seconds)
    except TimeoutError:
        return None


async def _off_loop(function: Callable[[], T]) -> T:
    """A blocking store call on the loop's default executor (shared threads, not one per handle)."""
    return await asyncio.get_running_loop().run_in_executor(None, function)


async def watch(handle: ExecutionHandle, poll_s: float = WATCH_POLL_S) -> AsyncIterator[RecordUpdate]:
    """Each module record as it changes (running, retrying, final), until the execution has ended;
    the changes one poll finds come in the order they happened (a parent's end before its child's)."""
    seen: dict[str, ModuleRecord] = {}
    while True:
        ended = (await _off_loop(handle.status)).final
        records = await _off_loop(handle.records)
        changed = [(name, record) for name, record in records.items() if seen.get(name) != record]
        for name, record in sorted(changed, key=lambda item: _changed_at(item[1])):
            seen[name] = record
            yield RecordUpdate(name, record)
        if ended:
            return
        await asyncio.sleep(poll_s)


def _changed_at(record: ModuleRecord) -> str:
    """When the record took its current state, as its ISO times tell (those sort as strings)."""
    return record.finished_at or record.started_at or ""


class ResultHub:
    """One pub/sub connection per event loop and result backend; waiters share it by channel."""

    _hubs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, ResultHub]] = weakref.WeakKeyDictionary()

    def __init__(self, url: str) -> None:
        self.client = redis.asyncio.Redis.from_url(url)
        self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        self.queues: dict[str, list[asyncio.Queue[bytes]]] = {}
        self.reader: asyncio.Task[None] | None = None
        self.lock = asyncio.Lock()

    @classmethod
    def of(cls, backend: RedisBackend) -> ResultHub:
        url = str(backend.url)
        hubs = cls._hubs.setdefault(asyncio.get_running_loop(), {})
        if url not in hubs:
            hubs[url] = cls(url)
        return hubs[url]

    @contextlib.asynccontextmanager
    async def subscribed(self, channel: str) -> AsyncIterator[asyncio.Queue[bytes]]:
        """A queue of this subscriber's own that receives every message published on ``channel``."""
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        async with self.lock:
            first = channel not in self.queues
            self.queues.setdefault(channel, []).append(queue)
            if first:
                await self.pubsub.subscribe(channel)
            if self.reader is None or self.reader.done():
                self.reader = asyncio.get_running_loop().create_task(self._read())
        try:
            yield queue
        finally:
            async with self.lock:
                listeners = self.queues.get(channel, [])
                with contextlib.suppress(ValueError):
                    listeners.remove(queue)
                if not listeners:
                    self.queues.pop(channel, None)
                    with contextlib.suppress(redis.RedisError):
                        await self.pubsub.unsubscribe(channel)

    async def _read(self) -> None:
        """Hand every message to the queues of its channel while anyone listens. A lost connection
        ends the reader (the waiters' periodic checks still find the result) until the next subscribe."""
        try:
            while self.queues:
                message = await self.pubsub.get_message(timeout=1.0)
                if message and message["type"] == "message":
                    channel = message["channel"]
                    channel = channel.decode() if isinstance(channel, bytes) else channel
                    for queue in self.queues.get(channel, []):
                        queue.put_nowait(message["data"])
        except (redis.RedisError, OSError) as exc:
            log.warning("result pub/sub connection lost (%s); waiting handles poll until it is back", exc)
            await self._reset()

    async def _reset(self) -> None:
        with contextlib.suppress(Exception):
            await self.pubsub.aclose()
        self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        self.queues.clear()
