"""The shared LM cache: identical DSPy LM requests anywhere in the cluster are answered once.

Real workers (`lm_cache: redis` through DSPEX_LM_CACHE) and the counting LM of
tests/modules/lm_usage_mods.py, which counts the calls it really gets in a Redis hash.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import dspy
import pytest
import redis

from dspex_celery import Program, submit_batch
from dspex_celery.batch import BatchResult
from dspex_celery.integrations.lm_cache import TAG, redis_lm_cache
from dspex_celery.report import load_report, render_html
from dspex_celery.state import StateStore
from tests.conftest import Cluster
from tests.modules import lm_usage_mods
from tests.modules.lm_usage_mods import answer_program

pytestmark = pytest.mark.integration

LINES = 6


def counted(cluster: Cluster) -> dict[str, int]:
    """What the counting LM got so far: calls and the tokens it reported."""
    raw = cluster.runtime.store.client.hgetall(counter_key(cluster))
    return {field: int(value) for field, value in raw.items()}


def counter_key(cluster: Cluster) -> str:
    return f"{cluster.settings.namespace}:lm-counter"


@pytest.fixture(scope="module")
def cached(make_cluster) -> Cluster:
    """Two worker processes (one prefork worker) sharing the LM cache."""
    cluster = make_cluster()
    cluster.start_worker("default", concurrency=2, env={lm_usage_mods.COUNTER_ENV: counter_key(cluster),
                                                       "DSPEX_LM_CACHE": "redis"})
    return cluster


def batch_lines(tag: str) -> list[dict[str, str]]:
    """LINES lines, two distinct LM requests each."""
    return [{"question": f"{tag} question {i}", "again": f"{tag} again {i}"} for i in range(LINES)]


def run_batch(cluster: Cluster, lines: list[dict[str, str]]) -> BatchResult:
    result = submit_batch(Program.from_dict(answer_program()), lines, app=cluster.runtime.app).get()
    assert result.count("succeeded") == LINES, [line.error for line in result.lines]
    return result


def test_second_identical_batch_makes_no_lm_call(cached: Cluster) -> None:
    # Given a batch of 6 lines, 12 distinct LM requests, run once on workers sharing the cache
    lines = batch_lines(uuid.uuid4().hex[:8])
    first = run_batch(cached, lines)
    after_first = counted(cached)
    assert after_first["calls"] == 2 * LINES
    assert (first.usage.cache_misses, first.usage.cache_hits) == (2 * LINES, 0)
    # When the same batch runs again (nothing is reused: every line runs)
    second = run_batch(cached, lines)
    # Then the LM was not called once more: every request came from the cache, costing no tokens
    assert counted(cached) == after_first
    assert second.ran == LINES
    assert (second.usage.cache_hits, second.usage.cache_misses, second.usage.tokens) == (2 * LINES, 0, 0)
    assert second.summary()["usage"]["cache_hits"] == 2 * LINES
    # And the answers are the LM's, as in the first run
    assert [line.outputs for line in second.lines] == [line.outputs for line in first.lines]
    # And each module's record says it was answered from the cache
    records = cached.runtime.store.records(str(second.lines[0].execution_id))
    assert [(r.lm_cache_hits, r.lm_cache_misses, r.prompt_tokens) for r in records.values()] == [(1, 0, 0)] * 2
    # And the HTML report of one line's execution says so, per module and in total
    html = render_html(load_report(cached.runtime, str(second.lines[0].execution_id)))
    assert "LM usage: tokens 0 (0 prompt + 0 completion), cost -, LM cache 2 hit(s) / 0 miss(es)" in html
    assert html.count('<td class="num">1/1</td>') == 2
    # And another process (this one) asking DSPy the same request is answered from what workers stored
    assert ask(redis_lm_cache(cached.runtime.store, 60, 100), lines[0]["question"])[1] is False


def test_entries_are_json_under_the_namespace(cached: Cluster) -> None:
    # Given an execution whose two modules send the very same request at the same time
    question = f"json {uuid.uuid4().hex[:8]}"
    before = counted(cached)["calls"]
    result = cached.run(Program.from_dict(answer_program()), {"question": question, "again": question})
    assert result.succeeded, result.modules
    # Then each module looked it up once, and the LM was called once per miss
    lookups = [(record.lm_cache_hits, record.lm_cache_misses) for record in result.modules.values()]
    assert [hits + misses for hits, misses in lookups] == [1, 1]
    assert counted(cached)["calls"] - before == sum(misses for _, misses in lookups)
    # And its entry is plain JSON (DSPy's result record, no pickle) under the namespace's LM cache keys
    client = cached.runtime.store.client
    keys = list(client.scan_iter(match=f"{cached.settings.namespace}:{TAG}:e:*"))
    assert keys
    entry = json.loads(client.get(keys[0]))
    assert entry["type"] is None and entry["data"]["_dspy_format"].startswith("dspy-")


# --- TTL and size bound: the cache class on the suite's Redis, asked by DSPy in this process -----


@pytest.fixture
def store(redis_url: str) -> Any:
    store = StateStore(redis.Redis.from_url(redis_url, decode_responses=True), f"lmcache-{uuid.uuid4().hex[:8]}", 60)
    yield store
    for key in store.client.scan_iter(match=f"{store.namespace}:*"):
        store.client.delete(key)


def ask(cache: Any, question: str) -> tuple[str, bool]:
    """DSPy asks the counting LM through ``cache``: the answer, and whether the LM was called."""
    engine = lm_usage_mods.CountingEngine()
    calls: list[int] = []
    complete = engine.complete
    engine.complete = lambda request: calls.append(1) or complete(request)  # type: ignore[method-assign]
    previous = dspy.cache
    dspy.cache = cache
    try:
        with dspy.context(lm=dspy.LM("fake/counting", engine=engine)):
            answer = dspy.Predict("question -> answer")(question=question).answer
    finally:
        dspy.cache = previous
    return answer, bool(calls)


def test_entries_expire_after_the_ttl(store: Any) -> None:
    cache = redis_lm_cache(store, ttl_s=1, max_entries=100)
    assert ask(cache, "ttl one") == ("one ttl", True)
    assert ask(cache, "ttl one") == ("one ttl", False)
    time.sleep(1.2)
    assert ask(cache, "ttl one") == ("one ttl", True)


def test_size_bound_evicts_the_least_recently_used(store: Any) -> None:
    # Given a cache of at most 3 entries holding a, b, c (a used again since)
    cache = redis_lm_cache(store, ttl_s=60, max_entries=3)
    for name in ("a", "b", "c"):
        ask(cache, f"entry {name}")
    assert not ask(cache, "entry a")[1]
    # When a fourth entry is written
    ask(cache, "entry d")
    # Then the least recently used one (b) was evicted, and the bound holds
    assert ask(cache, "entry b")[1]
    entries = list(store.client.scan_iter(match=f"{store.namespace}:{TAG}:e:*"))
    assert len(entries) == 3
    assert store.client.zcard(f"{store.namespace}:{TAG}:lru") == 3
    # And the others were kept (b's answer pushed out c, the least recently used then)
    assert not ask(cache, "entry a")[1] and not ask(cache, "entry d")[1]


def test_an_entry_naming_another_class_is_a_miss(store: Any) -> None:
    # Given a cached answer whose entry was replaced by one naming a class outside litellm's responses
    cache = redis_lm_cache(store, ttl_s=60, max_entries=10)
    ask(cache, "forged entry")
    for key in store.client.scan_iter(match=f"{store.namespace}:{TAG}:e:*"):
        store.client.set(key, json.dumps({"type": "subprocess:Popen", "data": ["true"]}))
    # Then the request goes to the LM again (nothing is imported or built from the entry)
    assert ask(cache, "forged entry") == ("entry forged", True)


def test_an_unreachable_redis_does_not_fail_the_call() -> None:
    # Given a cache whose Redis does not answer (nothing listens on the port)
    down = StateStore(redis.Redis(port=1, socket_connect_timeout=0.5, decode_responses=True), "lmcache-down", 60)
    cache = redis_lm_cache(down, ttl_s=60, max_entries=10)
    # Then every request is answered by the LM
    assert ask(cache, "no redis") == ("redis no", True)
    assert ask(cache, "no redis") == ("redis no", True)
