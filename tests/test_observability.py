"""Traces and metrics on real workers: one OpenTelemetry trace per execution across the client and
worker processes; a worker's Prometheus endpoint after a run."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import CLI, ROOT, assert_one_line_error, free_port, program, wait_for

pytestmark = pytest.mark.integration

DIAMOND = {
    "a": {"uses": "tests.modules.basic:add", "inputs": {"a": 1, "b": 2}},
    "b": {"uses": "tests.modules.basic:inc", "inputs": {"x": "$a.sum"}},
    "c": {"uses": "tests.modules.basic:inc", "inputs": {"x": "$a.sum"}, "resource": "io"},
    "d": {"uses": "tests.modules.basic:total", "inputs": {"b": "$b.x", "c": "$c.x"}},
}


def _spans(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_one_trace_per_execution_with_a_child_span_per_module_call(make_cluster: Any, tmp_path: Path) -> None:
    cluster = make_cluster()
    spans_file = tmp_path / "spans.jsonl"
    tracing = {"DSPEX_TEST_SPANS_FILE": str(spans_file)}
    cluster.start_worker("default", "io", extra_args=("--include", "tests.modules.observability_mods"), env=tracing)
    definition = {"name": "traced", "inputs": [], "modules": DIAMOND}
    client = subprocess.run([sys.executable, "-m", "tests.modules.observability_mods", json.dumps(definition)],
                            cwd=ROOT, env=cluster.env(**tracing), capture_output=True, text=True, timeout=90)
    assert client.returncode == 0, client.stderr
    execution_id = client.stdout.strip()

    spans = wait_for(lambda: (found := _spans(spans_file)) and len(found) >= 5 and found, what="five spans")
    roots = [span for span in spans if span["name"] == "dspex.execution traced"]
    modules = [span for span in spans if span["name"].startswith("dspex.module ")]
    assert len(roots) == 1 and len(modules) == 4
    root = roots[0]
    assert root["attributes"]["dspex.execution_id"] == execution_id
    assert root["parent_id"] is None
    assert {span["trace_id"] for span in modules} == {root["trace_id"]}
    assert {span["parent_id"] for span in modules} == {root["span_id"]}
    assert sorted(span["attributes"]["dspex.module"] for span in modules) == ["a", "b", "c", "d"]
    by_module = {span["attributes"]["dspex.module"]: span for span in modules}
    assert by_module["c"]["attributes"]["dspex.resource"] == "io"
    for span in modules:
        attributes = span["attributes"]
        assert attributes["dspex.program"] == "traced" and attributes["dspex.attempt"] == 1
        assert attributes["dspex.worker"].startswith("dspex-") and attributes["dspex.status"] == "succeeded"
        assert span["status"] == "OK" and span["pid"] != root["pid"]  # across the worker boundary


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def _value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    """The sum over the samples of ``name`` whose labels include ``labels`` (pool processes apart)."""
    return sum(value for (sample, found), value in samples.items()
               if sample == name and set(labels.items()) <= set(found))


def test_worker_metrics_endpoint_counts_the_module_calls_of_a_run(make_cluster: Any) -> None:
    cluster = make_cluster()
    port = free_port()
    cluster.start_worker("default", "io", concurrency=2, extra_args=("--metrics-port", str(port)))
    assert cluster.run(program("metered", DIAMOND)).succeeded
    flaky = program("metered_fail", {
        "boom": {"uses": "tests.modules.basic:fail", "circuit_breaker": {"failures": 1, "reset_s": 60}},
    })
    assert not cluster.run(flaky).succeeded

    def scraped() -> dict[Any, float] | None:
        samples = _scrape(port)
        return samples if _value(samples, "dspex_module_attempts_total", program="metered") >= 4 else None

    samples = wait_for(scraped, what="module metrics of the run")
    for module in "abcd":
        assert _value(samples, "dspex_module_attempts_total", program="metered", module=module,
                      outcome="succeeded") == 1
        assert _value(samples, "dspex_module_duration_seconds_count", program="metered", module=module) == 1
    assert _value(samples, "dspex_module_attempts_total", program="metered", module="c", resource="io") == 1
    assert _value(samples, "dspex_queue_wait_seconds_count") >= 4
    assert _value(samples, "dspex_module_failures_total", program="metered_fail", module="boom") >= 1
    assert _value(samples, "dspex_breaker_state", breaker="metered_fail.boom") == 2  # open


def test_a_busy_metrics_port_is_one_line_and_no_worker(make_cluster: Any) -> None:
    cluster = make_cluster()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([CLI, "worker", "--metrics-port", str(port)], cwd=ROOT, env=cluster.env(),
                                capture_output=True, text=True, timeout=60)
    assert_one_line_error(result, 2, f"127.0.0.1:{port}", "--metrics-port")
