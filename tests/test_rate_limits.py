"""429-adaptive limits: a class's cluster-wide limit halves on a rate-limit error and Retry-After is
honoured, against a fake LM that answers 429 above 4 concurrent calls, on real workers."""

from __future__ import annotations

import email.utils
import json
import time
import uuid

import pytest
from click.testing import CliRunner

from dspex_celery import Program, submit_batch
from dspex_celery.cli import cli
from dspex_celery.rate_limits import is_rate_limit, retry_after_s
from dspex_celery.resources import parse_limits, snapshot
from dspex_celery.results import parse_time
from tests.conftest import Cluster
from tests.modules.rate_limit_mods import TooManyRequests, client

LM = "tests.modules.rate_limit_mods:limited_lm"
LIMITS = {"llm": {"max_concurrent": 8, "recover_every_s": 60}}
ENV = {"DSPEX_RESOURCES": json.dumps(LIMITS)}
RETRY_AFTER_S = 0.5


@pytest.fixture(scope="module")
def cluster(make_cluster) -> Cluster:
    """Two workers of 4 threads serving `llm` (8 slots, llm: {max_concurrent: 8}) and `api` (no limit)."""
    cluster = make_cluster(resources=LIMITS)
    for _ in range(2):
        cluster.start_worker("llm", "api", concurrency=4, pool="threads", env=ENV, wait=False)
    for worker in cluster.workers:
        worker.wait_ready()
    return cluster


def lm_program(name: str, resource: str, key: str, seconds: float = 0.4) -> Program:
    inputs = {"question": "$inputs.question", "key": key, "retry_after_s": RETRY_AFTER_S, "seconds": seconds}
    return Program.from_dict({
        "name": name, "inputs": ["question"],
        "modules": {"answer": {"uses": LM, "inputs": inputs, "resource": resource,
                               "retry": {"max_attempts": 8, "backoff_s": 0.05}}},
    })


def calls_of(key: str) -> list[dict]:
    return sorted((json.loads(item) for item in client().lrange(f"{key}:calls", 0, -1)), key=lambda c: c["at"])


def test_batch_converges_under_an_lm_that_rate_limits_above_4(cluster: Cluster) -> None:
    # Given a fake LM that answers 429 (Retry-After 0.5 s) above 4 concurrent calls, and 8 llm slots
    key = f"lm-{uuid.uuid4().hex}"
    lines = [{"question": f"q{i}"} for i in range(40)]
    # When a 40-line batch runs with 16 executions in flight
    result = submit_batch(lm_program("rl", "llm", key), lines, app=cluster.runtime.app, max_in_flight=16).get()
    # Then no line failed, each with its own answer
    assert [line.status for line in result.lines] == ["succeeded"] * 40
    assert [line.outputs["answer"]["answer"] for line in result.lines] == [f"Q{i}" for i in range(40)]
    # And the LM did rate-limit at first, then the limit held: the last half of the calls saw <= 4 in flight
    calls = calls_of(key)
    rate_limited = [call for call in calls if call["status"] == 429]
    assert rate_limited, "the fake LM never answered 429: the test proves nothing"
    assert max(call["in_flight"] for call in calls[len(calls) // 2:]) <= 4
    assert len(rate_limited) <= 12
    # And every retry after a 429 started at least Retry-After after that attempt ended
    store = cluster.runtime.store
    gaps = [parse_time(after["started_at"]) - parse_time(before["finished_at"])
            for line in result.lines for before, after in zip(store.attempts(line.execution_id),
                                                              store.attempts(line.execution_id)[1:])]
    assert gaps and min(gap.total_seconds() for gap in gaps) >= RETRY_AFTER_S - 0.005
    # And `resources` shows the lowered limit and why
    row = next(row for row in snapshot(store, parse_limits(LIMITS)) if row["resource"] == "llm")
    assert row["adaptive"]["limit"] <= 4 and row["adaptive"]["halvings"] >= 1
    table = CliRunner().invoke(cli, ["resources"], env=cluster.env(COLUMNS="120", **ENV)).stdout
    llm_line = next(line for line in table.splitlines() if line.startswith("llm"))
    assert llm_line.split()[1] == f"{row['adaptive']['limit']}/8"
    assert f"halved {row['adaptive']['halvings']}× after 429, +1 per 60 s quiet" in llm_line


def test_unconfigured_class_gets_a_limit_at_its_first_429(cluster: Cluster) -> None:
    # Given `api`, a class with no configured limit, and the same rate-limiting LM
    key = f"api-{uuid.uuid4().hex}"
    lines = [{"question": f"q{i}"} for i in range(16)]
    # When a batch runs on its 8 slots
    run = submit_batch(lm_program("rl_api", "api", key, seconds=0.3), lines, app=cluster.runtime.app, max_in_flight=16)
    result = run.get()
    # Then it completes, and the class now has an adaptive limit: at most half its 8 worker slots
    assert [line.status for line in result.lines] == ["succeeded"] * 16
    assert any(call["status"] == 429 for call in calls_of(key))
    row = next(row for row in snapshot(cluster.runtime.store, {}) if row["resource"] == "api")
    assert row["configured"] is False and row["adaptive"]["cap"] == 8 and row["adaptive"]["limit"] <= 4


class Response:
    def __init__(self, headers: dict[str, str]) -> None:
        self.status_code, self.headers = 429, headers


class HttpError(Exception):
    def __init__(self, headers: dict[str, str]) -> None:
        super().__init__("429")
        self.response = Response(headers)


def test_retry_after_forms() -> None:
    assert retry_after_s(TooManyRequests("slow down", 2.5)) == 2.5
    assert retry_after_s(HttpError({"retry-after-ms": "1500"})) == 1.5
    in_3s = email.utils.formatdate(time.time() + 3, usegmt=True)
    assert 1.0 < (retry_after_s(HttpError({"Retry-After": in_3s})) or 0) <= 3.0
    assert retry_after_s(HttpError({})) is None and is_rate_limit(HttpError({}))
    # raised from a rate-limit error (DSPy wraps the LM's error), and plain errors are not
    try:
        try:
            raise TooManyRequests("inner", 1)
        except TooManyRequests as inner:
            raise RuntimeError("adapter failed") from inner
    except RuntimeError as outer:
        assert retry_after_s(outer) == 1.0
    assert not is_rate_limit(ValueError("429 in the text is not enough"))


class RateLimitError(Exception):
    """Named like litellm's, openai's and anthropic's (importing litellm takes seconds)."""


def test_lm_client_rate_limit_classes_count_by_name() -> None:
    assert is_rate_limit(RateLimitError("rate limited")) and retry_after_s(RateLimitError()) is None
