"""LM usage per module call, summed per execution and per batch, shown by run, show, history, optimize.

Real workers and a listener writing history; the counting LM of tests/modules/lm_usage_mods.py adds
the usage it reports to a Redis hash, which the records' totals must equal.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dspex_celery import Program, submit_batch
from dspex_celery.integrations.lm_cache import TAG
from dspex_celery.optimizer import optimize
from dspex_celery.usage import total_usage
from tests.conftest import HistoryCluster
from tests.modules import lm_usage_mods
from tests.modules.lm_usage_mods import answer_program

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def hc(make_cluster, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HistoryCluster]:
    """A worker (no shared LM cache), a listener and its SQLite history."""
    cluster = make_cluster()
    cluster.start_worker("default", concurrency=4, pool="threads",
                         env={lm_usage_mods.COUNTER_ENV: counter_key(cluster.settings.namespace)})
    history = HistoryCluster(cluster, f"sqlite:///{tmp_path_factory.mktemp('usage') / 'history.db'}", redis_url)
    history.start_listener().wait_ready()
    yield history
    history.stop()


def counter_key(namespace: str) -> str:
    return f"{namespace}:lm-counter"


def reported(hc: HistoryCluster) -> dict[str, int]:
    """The usage the counting LM reported so far (calls, prompt and completion tokens)."""
    raw = hc.cluster.runtime.store.client.hgetall(counter_key(hc.cluster.settings.namespace))
    return {field: int(value) for field, value in raw.items()}


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {field: after.get(field, 0) - before.get(field, 0) for field in ("calls", "prompt_tokens", "completion_tokens")}


def test_execution_tokens_equal_the_lm_reports_and_are_shown(hc: HistoryCluster, tmp_path: Path) -> None:
    # Given a two-module program whose LM reports its usage
    program = tmp_path / "usage.json"
    program.write_text(json.dumps(answer_program("usage_cli")))
    before = reported(hc)
    tag = uuid.uuid4().hex[:6]  # requests no earlier run (nor DSPy's own cache) has seen
    # When `run` runs it
    done = hc.cli("run", str(program), "-i", f"question=why is {tag} blue", "-i", f"again=when is {tag} red")
    assert done.returncode == 0, done.stderr
    spent = delta(reported(hc), before)
    assert spent["calls"] == 2
    tokens = spent["prompt_tokens"] + spent["completion_tokens"]
    # Then its summary line has the LM's own totals
    assert (f"LM usage: tokens {tokens} ({spent['prompt_tokens']} prompt + "
            f"{spent['completion_tokens']} completion)") in done.stdout
    # And the recorded execution sums to them, one module at a time
    execution_id = done.stdout.split()[1]
    result = hc.recorded(execution_id)
    usage = total_usage(result.modules.values())
    assert (usage.prompt_tokens, usage.completion_tokens) == (spent["prompt_tokens"], spent["completion_tokens"])
    assert all(record.prompt_tokens > 0 and record.completion_tokens > 0 for record in result.modules.values())
    # And `show` and `history` print them
    shown = hc.cli("show", execution_id)
    assert shown.returncode == 0, shown.stderr
    assert f"LM usage: tokens {tokens} " in shown.stdout
    table = hc.cluster.cli("history", "--program", "usage_cli", env={"DSPEX_HISTORY_URL": hc.url, "COLUMNS": "200"})
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split()[5:7] == ["tokens", "cost"]
    assert any(row.split()[0] == execution_id and row.split()[6] == str(tokens) for row in rows), table.stdout
    # And optimize's per-module statistics have tokens per run (its table prints them)
    report = optimize(hc.history, "usage_cli", save=False)
    assert sum(stats.tokens_per_run or 0 for stats in report.modules.values()) == tokens


def test_batch_tokens_are_the_sum_of_its_executions(hc: HistoryCluster) -> None:
    # Given a batch of 5 lines (10 distinct LM requests)
    tag = uuid.uuid4().hex[:6]
    lines: list[dict[str, Any]] = [{"question": f"{tag} q {i} " + "word " * i, "again": f"{tag} a {i}"} for i in range(5)]
    before = reported(hc)
    result = submit_batch(Program.from_dict(answer_program("usage_batch")), lines, app=hc.cluster.runtime.app).get()
    assert result.count("succeeded") == 5, [line.error for line in result.lines]
    spent = delta(reported(hc), before)
    # Then the batch's totals are what the LM reported, and each line's are its execution's records
    assert spent["calls"] == 10
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (spent["prompt_tokens"],
                                                                             spent["completion_tokens"])
    summary = result.summary()["usage"]
    assert summary["tokens"] == spent["prompt_tokens"] + spent["completion_tokens"]
    for line in result.lines:
        records = hc.cluster.runtime.store.records(str(line.execution_id))
        assert line.usage == total_usage(records.values())
        assert line.to_json()["usage"]["tokens"] == line.usage.tokens > 0
    # And without the shared LM cache (the default) every request went to the LM: no lookups, no entries
    assert (result.usage.cache_hits, result.usage.cache_misses) == (0, 0)
    client = hc.cluster.runtime.store.client
    assert not list(client.scan_iter(match=f"{hc.cluster.settings.namespace}:{TAG}:*"))


def test_cost_per_module_call_is_recorded_and_summed(hc: HistoryCluster) -> None:
    # Given a program whose LM prices each call (as litellm does for known models)
    program = answer_program("usage_cost")
    program["dspy"] = {"lm": "tests.modules.lm_usage_mods:priced_lm"}
    # When it runs (two modules, one LM call each)
    result = hc.cluster.run(Program.from_dict(program), {"question": "a", "again": "b"})
    assert result.succeeded, result.modules
    # Then each record has its call's cost, and the execution's total is their sum
    assert [record.lm_cost for record in result.modules.values()] == [lm_usage_mods.PRICE_PER_CALL] * 2
    usage = total_usage(result.modules.values())
    assert usage.cost == 2 * lm_usage_mods.PRICE_PER_CALL
    assert "cost $0.5000" in usage.describe()


def test_a_retried_module_records_the_usage_of_every_attempt(hc: HistoryCluster) -> None:
    # Given a module that asks the LM and then fails its first attempt (retried after 0.1 s)
    program = {"name": "usage_retry", "inputs": ["question"], "dspy": {"lm": "tests.modules.lm_usage_mods:counting_lm"},
               "modules": {"ask": {"uses": "tests.modules.lm_usage_mods:AnswerThenFailOnce",
                                   "inputs": {"question": "$inputs.question"}, "retry": {"backoff_s": 0.1}}},
               "outputs": {"answer": "$ask.answer"}}
    before = reported(hc)
    result = hc.cluster.run(Program.from_dict(program), {"question": f"retry {uuid.uuid4().hex[:6]}"})
    assert result.succeeded, result.modules
    spent = delta(reported(hc), before)
    # Then both attempts called the LM, and the final record has the tokens of both
    record = result.modules["ask"]
    assert (record.attempts, spent["calls"]) == (2, 2)
    assert (record.prompt_tokens, record.completion_tokens) == (spent["prompt_tokens"], spent["completion_tokens"])
