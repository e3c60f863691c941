"""Store scripts over each thread's direct connection (``redis_clients.DirectScripts``): the same
replies and errors as redis-py's path, and a call that survives a lost connection, a flushed script
cache and a fork."""

from __future__ import annotations

import multiprocessing
import threading

import fakeredis
import pytest
import redis

from dspex_celery.redis_clients import DirectScripts, connect
from dspex_celery.state import StateStore
from dspex_celery.testing import fresh_namespace

pytestmark = pytest.mark.integration

INCR = "return {redis.call('INCRBY', KEYS[1], ARGV[1]), ARGV[2], false, {'nested', 7}}"
FAILS = "return redis.error_reply('WRONGTYPE not what this script expects')"


@pytest.fixture
def store(redis_url: str) -> StateStore:
    store = StateStore.from_url(redis_url, fresh_namespace("direct"), 60)
    yield store
    store.client.delete(*store.client.keys(f"{store.namespace}:*") or ["-"])


def link_id(store: StateStore) -> int:
    """The server's id of the calling thread's direct connection."""
    return int(store._direct._local.link.call(("CLIENT", "ID")))


def test_a_script_replies_over_the_direct_connection_as_through_redis_py(store: StateStore) -> None:
    key = store.global_key("n")
    script = store.script(INCR)
    # When called through the store (direct) and through redis-py's own Script
    direct = script(keys=[key], args=[2, "é"])
    plain = store.client.register_script(INCR)(keys=[key], args=[3, "é"])
    # Then both give the same shape of reply (str, int, None for false, nested lists), in order
    assert direct == [2, "é", None, ["nested", 7]]
    assert plain == [5, "é", None, ["nested", 7]]
    assert store._direct is not None and store._direct._local.link is not None


def test_an_error_reply_raises_what_redis_py_raises(store: StateStore) -> None:
    with pytest.raises(redis.ResponseError) as direct:
        store.script(FAILS)()
    with pytest.raises(redis.ResponseError) as plain:
        store.client.register_script(FAILS)()
    assert type(direct.value) is type(plain.value) and str(direct.value) == str(plain.value)


def test_a_flushed_script_cache_and_a_killed_connection_do_not_fail_a_call(store: StateStore) -> None:
    key = store.global_key("n")
    script = store.script(INCR)
    assert script(keys=[key], args=[1, "a"])[0] == 1
    # When Redis forgets its scripts (a restart, SCRIPT FLUSH), the next call loads it again
    store.client.script_flush()
    assert script(keys=[key], args=[1, "a"])[0] == 2
    # When the server drops the thread's direct connection, the next call goes through redis-py
    link = store._direct._local.link
    store.client.client_kill_filter(_id=link_id(store))
    assert script(keys=[key], args=[1, "a"])[0] == 3
    assert script(keys=[key], args=[1, "a"])[0] == 4
    assert store._direct._local.link is not link  # a new direct connection, made on the call after the loss


def test_each_thread_has_its_own_direct_connection(store: StateStore) -> None:
    key = store.global_key("n")
    script = store.script(INCR)
    ids: list[int] = []

    def calls() -> None:
        for _ in range(50):
            script(keys=[key], args=[1, "t"])
        ids.append(link_id(store))

    threads = [threading.Thread(target=calls) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert int(store.client.get(key)) == 200
    assert len(set(ids)) == 4


def _child_calls(store: StateStore, key: str, queue: multiprocessing.Queue) -> None:
    queue.put(store.script(INCR)(keys=[key], args=[10, "child"])[0])


def test_a_forked_process_makes_its_own_direct_connection(store: StateStore) -> None:
    key = store.global_key("n")
    script = store.script(INCR)
    assert script(keys=[key], args=[1, "parent"])[0] == 1  # the parent's link exists before the fork
    queue: multiprocessing.Queue = multiprocessing.get_context("fork").Queue()
    child = multiprocessing.get_context("fork").Process(target=_child_calls, args=(store, key, queue))
    child.start()
    child.join(30)
    # Then the child's reply was its own, and the parent's link still reads its own replies
    assert queue.get(timeout=5) == 11
    assert [script(keys=[key], args=[1, "parent"])[0] for _ in range(3)] == [12, 13, 14]


def test_only_a_plain_redis_client_gets_direct_connections(redis_url: str) -> None:
    assert DirectScripts.suits(connect(redis_url))
    assert not DirectScripts.suits(fakeredis.FakeRedis(decode_responses=True))
    assert not DirectScripts.suits(redis.Redis.from_url(redis_url, protocol=3))
