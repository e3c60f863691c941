"""The asyncio API on real workers and embedded: ``await handle``, ``get_async``, ``watch``,
``asubmit_program``; many awaited handles share the loop, not a thread each."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
import redis

from dspex_celery import asubmit_program
from dspex_celery.errors import ExecutionFailed, ExecutionTimeout
from dspex_celery.results import ExecutionStatus, ModuleStatus
from tests.conftest import REDIS_URL, program

SLEEPY = {
    "nap": {"uses": "tests.modules.basic:sleep", "inputs": {"seconds": 0.3, "value": "$inputs.n"}},
    "after": {"uses": "tests.modules.basic:inc", "inputs": {"x": "$nap.value"}},
}
FAILING = {"boom": {"uses": "tests.modules.basic:fail", "inputs": {"message": "no luck"}}}


@pytest.fixture(scope="module")
def app(make_cluster: Any) -> Any:
    cluster = make_cluster()
    cluster.start_worker(concurrency=8, pool="threads")
    return cluster.runtime.app


@pytest.mark.integration
def test_twenty_handles_awaited_at_once_without_a_thread_each(app: Any) -> None:
    monitor = redis.Redis.from_url(REDIS_URL)

    def most_channels_on_one_connection() -> int:
        return max((int(client["sub"]) for client in monitor.client_list(_type="pubsub")), default=0)

    async def main() -> tuple[list[Any], int, int]:
        handles = [await asubmit_program(program("many", SLEEPY, ["n"]), {"n": n}, app=app) for n in range(20)]
        before = threading.active_count()
        peak_threads, shared = before, 0
        gathered = asyncio.ensure_future(asyncio.gather(*handles))
        while not gathered.done():
            peak_threads = max(peak_threads, threading.active_count())
            shared = max(shared, most_channels_on_one_connection())
            await asyncio.sleep(0.02)
        return gathered.result(), peak_threads - before, shared

    results, extra_threads, shared = asyncio.run(main())
    assert [result.outputs["after"]["x"] for result in results] == [n + 1 for n in range(20)]
    assert all(result.status is ExecutionStatus.SUCCEEDED for result in results)
    assert shared >= 10  # the waiting handles share one pub/sub connection (not one each)
    assert extra_threads < 10  # the loop's default executor at most, not one per handle (20)


@pytest.mark.integration
def test_get_async_times_out_and_failures_raise_as_get_does(app: Any) -> None:
    async def main() -> None:
        slow = await asubmit_program(program("slow", SLEEPY, ["n"]), {"n": 1}, app=app)
        with pytest.raises(ExecutionTimeout):
            await slow.get_async(timeout=0.05)
        assert (await slow).outputs["after"] == {"x": 2}  # the execution went on
        failing = await asubmit_program(program("failing", FAILING), app=app)
        with pytest.raises(ExecutionFailed, match="no luck"):
            await failing
        result = await failing.get_async(propagate=False)
        assert result.status is ExecutionStatus.FAILED and result.failed_modules == ["boom"]

    asyncio.run(main())


@pytest.mark.integration
def test_watch_yields_each_record_change_until_the_end(app: Any) -> None:
    async def main() -> list[tuple[str, ModuleStatus]]:
        handle = await asubmit_program(program("watched", SLEEPY, ["n"]), {"n": 5}, app=app)
        return [(update.module, update.record.status) async for update in handle.watch(poll_s=0.05)]

    seen = asyncio.run(main())
    assert ("nap", ModuleStatus.RUNNING) in seen
    assert seen.index(("nap", ModuleStatus.SUCCEEDED)) < seen.index(("after", ModuleStatus.SUCCEEDED))
    assert seen[-1][1] is ModuleStatus.SUCCEEDED and len(seen) == len(set(seen))


def test_await_an_embedded_execution(runtime: Any) -> None:
    async def main() -> Any:
        return await (await asubmit_program(program("embedded_async", SLEEPY, ["n"]), {"n": 2}, app=runtime.app))

    assert asyncio.run(main()).outputs["after"] == {"x": 3}
