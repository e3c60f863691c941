"""Batch runs over datasets on real workers: order, bounded in-flight, kill + resume, metric."""

from __future__ import annotations

import dataclasses
import json
import os
import pty
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner

from dspex_celery import Program, Settings, create_runtime, submit_batch, submit_program
from dspex_celery.batch import BatchItem, program_fingerprint
from dspex_celery.cli import cli
from tests.conftest import CLI, ROOT, Cluster, wait_for
from tests.modules import suite_redis_url
from tests.modules.dspy_mods import ANSWERS, rag_program

pytestmark = pytest.mark.integration

TOPICS = ("redis", "celery", "dspy", "chord")


@pytest.fixture(scope="module")
def cluster(make_cluster) -> Cluster:
    """Two workers serving the same queue: a prefork one and a threads one."""
    cluster = make_cluster()
    cluster.start_worker("default", concurrency=3)
    cluster.start_worker("default", concurrency=3, pool="threads")
    return cluster


def counter(cluster: Cluster, name: str) -> tuple[str, str]:
    return cluster.settings.broker_url or "", f"{cluster.settings.namespace}:calls:{name}"


def calls(cluster: Cluster, name: str) -> dict[str, int]:
    """How often Retrieve ran, per question (the Redis side channel)."""
    url, key = counter(cluster, name)
    return {field.decode(): int(value) for field, value in redis.Redis.from_url(url).hgetall(key).items()}


def dataset(count: int, *, fail_once: tuple[int, ...] = ()) -> list[dict[str, Any]]:
    """Lines `{question, answer}`: distinct questions, the gold answer is DummyLM's for the topic."""
    lines = []
    for index in range(count):
        topic = TOPICS[index % len(TOPICS)]
        marker = " FAIL-ONCE" if index in fail_once else ""
        gold = ANSWERS.get(topic, ANSWERS["[[ ## question ## ]]"])["answer"]
        lines.append({"question": f"line {index}{marker}: what is {topic}?", "answer": gold})
    return lines


def write_inputs(path: Path, lines: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def write_program(cluster: Cluster, folder: Path, name: str) -> Path:
    path = folder / f"{name}.json"
    path.write_text(json.dumps(rag_program(name, counter=counter(cluster, name))))
    return path


def read_output(path: Path) -> list[dict[str, Any]]:
    return [json.loads(text) for text in path.read_text().splitlines()]


def test_submit_batch_in_input_order_with_bounded_in_flight(cluster: Cluster) -> None:
    lines = dataset(40)
    program = Program.from_dict(rag_program("api", counter=counter(cluster, "api")))
    # When 40 lines run across both workers with at most 6 executions in flight
    run = submit_batch(program, lines, app=cluster.runtime.app, max_in_flight=6)
    peak = 0
    completed = []
    for line in run.as_completed():
        peak = max(peak, run.in_flight)
        completed.append(line)
    # Then every line is present once, with its own outputs, and never more than 6 were in flight
    result = sorted(completed, key=lambda line: line.index)
    assert [line.index for line in result] == list(range(40))
    assert all(line.succeeded for line in result)
    assert [line.outputs["query"] for line in result] == [line["question"] for line in lines]
    assert [line.outputs["answer"] for line in result] == [line["answer"] for line in lines]
    assert 1 <= peak <= 6
    # And each line ran exactly once, spread over both workers
    assert sorted(calls(cluster, "api").values()) == [1] * 40
    workers = {record.worker.split("@")[0] for line in result
               for record in cluster.runtime.store.records(line.execution_id).values()}
    assert workers == {worker.name for worker in cluster.workers}


def test_kill_the_client_half_way_then_rerun_runs_only_missing_lines(cluster: Cluster, tmp_path: Path) -> None:
    lines = dataset(200)
    program = write_program(cluster, tmp_path, "killed")
    inputs = write_inputs(tmp_path / "data.jsonl", lines)
    output = tmp_path / "out.jsonl"
    journal = tmp_path / "out.jsonl.partial"
    args = [CLI, "run", str(program), "--inputs-file", str(inputs), "--output", str(output), "--max-in-flight", "8"]
    # Given a batch client killed (SIGKILL) once about half of the lines are done
    client = subprocess.Popen(args, cwd=ROOT, env=cluster.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while finished_in(journal) < 100 and client.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    client.send_signal(signal.SIGKILL)
    client.wait(timeout=10)
    done_before = finished_in(journal)
    assert 100 <= done_before < 200, "the client was not killed half-way"
    assert not output.exists()
    # When the same command runs again
    rerun = cluster.cli(*args[1:], "--json")
    # Then the output has every line, in input order, each with its own outputs
    assert rerun.returncode == 0, rerun.stderr
    result = read_output(output)
    assert [line["index"] for line in result] == list(range(200))
    assert [line["outputs"]["query"] for line in result] == [line["question"] for line in lines]
    assert not journal.exists()
    # And no line ran twice: finished lines were reused, the killed run's in-flight ones re-attached
    assert sorted(calls(cluster, "killed").values()) == [1] * 200
    summary = json.loads(rerun.stdout)
    assert summary["reused"] >= done_before and summary["ran"] + summary["reattached"] + summary["reused"] == 200


def finished_in(journal: Path) -> int:
    """Lines with a final status in a batch journal."""
    if not journal.exists():
        return 0
    found = set()
    for text in journal.read_text().splitlines():
        try:
            line = json.loads(text)
        except json.JSONDecodeError:
            continue
        if line["status"] != "submitted":
            found.add(line["index"])
    return len(found)


def test_rerun_retries_failed_lines_and_metric_is_the_mean(cluster: Cluster, tmp_path: Path) -> None:
    lines = dataset(20, fail_once=(3, 9, 14))
    lines[0]["answer"] = "a wrong gold answer"
    program = write_program(cluster, tmp_path, "flaky")
    inputs = write_inputs(tmp_path / "data.jsonl", lines)
    metric = "tests.modules.dspy_mods:exact_match"
    # When a batch with a metric runs: three lines fail on their first call
    first = cluster.cli("run", str(program), "--inputs-file", str(inputs), "--metric", metric)
    assert first.returncode == 1
    output = tmp_path / "data.results.jsonl"  # default output: beside the inputs
    failed = [line["index"] for line in read_output(output) if line["status"] == "failed"]
    assert failed == [3, 9, 14]
    assert "ValueError: first call fails" in read_output(output)[3]["error"]
    # Then the mean counts failed and wrong lines as 0, like dspy.Evaluate
    assert "Average Metric: 16.00 / 20 (80.0%)" in first.stdout.splitlines()
    # When it runs again, only the failed lines run (and now succeed)
    second = cluster.cli("run", str(program), "--inputs-file", str(inputs), "--metric", metric, "--json")
    assert second.returncode == 0, second.stderr
    summary = json.loads(second.stdout)
    assert (summary["ran"], summary["reused"], summary["succeeded"]) == (3, 17, 20)
    assert summary["ran_because"] == {"failed": 3}
    assert summary["metric"] == {"name": "exact_match", "total": 19.0, "score": 95.0}
    counts = calls(cluster, "flaky")
    assert sorted(index for index, line in enumerate(lines) if counts[line["question"]] == 2) == [3, 9, 14]
    assert [line["score"] for line in read_output(output)][:2] == [0.0, 1.0]


def test_progress_only_on_a_terminal(tmp_path: Path) -> None:
    inputs = write_inputs(tmp_path / "data.jsonl", [{"question": "What is Redis?"}] * 3 + [{"q": 1}])
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("DSPEX_") or k == "DSPEX_HISTORY_URL"},
           "PYTHONPATH": str(ROOT)}
    args = [CLI, "run", "examples/dspy_rag.yaml", "--inputs-file", str(inputs)]
    # On a terminal: a progress line on stderr; the invalid line is reported, exit 1
    leader, follower = pty.openpty()
    done = subprocess.run(args, check=False, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=follower, timeout=90)
    os.close(follower)
    progress = os.read(leader, 65536).decode(errors="replace")
    os.close(leader)
    assert done.returncode == 1 and "batch 4/4" in progress
    assert json.loads((tmp_path / "data.results.jsonl").read_text().splitlines()[3])["error"] == (
        "line 4: missing input question (program 'dspy_rag' takes question)"
    )
    # Not on a terminal (click's runner): no progress on stderr
    quiet = CliRunner().invoke(cli, args[1:])
    assert quiet.exit_code == 1 and quiet.stderr == ""
    assert "3 succeeded, 0 failed, 1 invalid (ran 0, re-attached 0, reused 3)" in quiet.stdout


@pytest.mark.parametrize(("extra", "message"), [
    (["--inputs-file", "missing.jsonl"], "error: inputs file missing.jsonl not found: check the path"),
    (["--output", "x.jsonl", "-i", "question=q"], "error: --output needs --inputs-file FILE.jsonl"),
    (["--fresh", "-i", "question=q"], "error: --fresh needs --inputs-file FILE.jsonl"),
    (["--inputs-file", "x.jsonl", "--metric", "tests.modules.dspy_mods:nope"],
     ("error: metric 'tests.modules.dspy_mods:nope' cannot be imported ('tests.modules.dspy_mods' has no "
      "attribute 'nope'): pass --metric package.module:function")),
    (["--inputs-file", "x.jsonl", "--detach"], "error: --detach cannot be combined with --inputs-file"),
])
def test_batch_usage_errors_are_one_line(extra: list[str], message: str) -> None:
    bad = CliRunner().invoke(cli, ["run", "examples/dspy_rag.yaml", *extra])
    assert (bad.exit_code, bad.stderr.strip()) == (2, message)


def test_submit_batch_embedded_with_labels_metric_and_invalid_items() -> None:
    app = create_runtime(Settings(namespace="batch-embedded")).app
    items: list[Any] = [*dataset(6), {"question": b"bytes"}]
    result = submit_batch(rag_program(), items, app=app, max_in_flight=3,
                          metric="tests.modules.dspy_mods:exact_match").get()
    assert [line.status for line in result.lines] == ["succeeded"] * 6 + ["invalid"]
    assert result.score == round(100 * 6 / 7, 2) and result.ran == 6
    # Items can be given ready-made (how the CLI passes lines it could not parse)
    broken = BatchItem(0, {}, {}, "k", "line 1: invalid JSON")
    assert submit_batch(rag_program(), [broken], app=app).get().lines[0].error == "line 1: invalid JSON"


# --- resume by program version, --fresh, Ctrl-C --------------------------------------------------


def tagger(key: str, *, name: str = "tagger", tag: str = "A", seconds: float = 0.0) -> dict[str, Any]:
    """A one-module program whose output is each line tagged with ``tag`` (counted under ``key``)."""
    inputs = {"line": "$inputs.line", "tag": tag, "key": key, "seconds": seconds}
    return {"name": name, "inputs": ["line"], "outputs": {"echo": "$step.echo"},
            "modules": {"step": {"uses": "tests.modules.batch_mods:step", "inputs": inputs}}}


def write_tagger(folder: Path, key: str, **options: Any) -> Path:
    path = folder / f"{options.get('name', 'tagger')}.json"
    path.write_text(json.dumps(tagger(key, **options)))
    return path


def fingerprint_of(path: Path) -> str:
    return program_fingerprint(Program.from_file(str(path)).plan())


def side_channel(key: str, name: str) -> dict[str, int]:
    """What batch_mods.step counted under ``{key}:{name}`` (started / finished), per TAG:LINE."""
    found = redis.Redis.from_url(suite_redis_url()).hgetall(f"{key}:{name}")
    return {field.decode(): int(value) for field, value in found.items()}


def journal_records(journal: Path) -> list[dict[str, Any]]:
    return [json.loads(text) for text in journal.read_text().splitlines() if text.strip()]


def test_rerun_reuses_only_the_lines_this_program_version_produced(cluster: Cluster, tmp_path: Path) -> None:
    key = f"{cluster.settings.namespace}:versions"
    program_a = write_tagger(tmp_path, key, tag="A")
    program_b = write_tagger(tmp_path, key, name="shouter", tag="B")
    inputs = write_inputs(tmp_path / "data.jsonl", [{"line": f"l{index}"} for index in range(3)])
    output = tmp_path / "out.jsonl"

    def batch(program: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
        done = cluster.cli("run", str(program), "--inputs-file", str(inputs), "--output", str(output), *extra)
        assert done.returncode == 0, done.stderr
        return done, [line["outputs"]["echo"] for line in read_output(output)]

    fingerprint_a, fingerprint_b = fingerprint_of(program_a), fingerprint_of(program_b)
    # Given program A's results in the output file
    first, echoes = batch(program_a, "--json")
    assert echoes == ["A:l0", "A:l1", "A:l2"]
    assert json.loads(first.stdout)["ran_because"] == {"new": 3}
    # When program B runs over the same inputs and output: it reuses nothing and writes its own outputs
    second, echoes = batch(program_b)
    assert echoes == ["B:l0", "B:l1", "B:l2"]
    assert (f"reused 0 lines of this program (fingerprint {fingerprint_b}); ran 3: 3 produced by another "
            f"program version (fingerprint {fingerprint_a})") in second.stdout.splitlines()
    # When A is edited (a literal changed) it is another version: every line runs again
    program_a.write_text(json.dumps(tagger(key, tag="A2")))
    fingerprint_edited = fingerprint_of(program_a)
    third, echoes = batch(program_a, "--json")
    assert echoes == ["A2:l0", "A2:l1", "A2:l2"]
    summary = json.loads(third.stdout)
    assert (summary["ran"], summary["reused"], summary["ran_because"], summary["other_versions"]) == (
        3, 0, {"other_version": 3}, {fingerprint_b: 3})
    # When the unchanged program runs again, it reuses its own lines; a changed input line runs alone
    fourth, echoes = batch(program_a)
    assert echoes == ["A2:l0", "A2:l1", "A2:l2"]
    assert f"reused 3 lines of this program (fingerprint {fingerprint_edited}); ran 0" in fourth.stdout.splitlines()
    write_inputs(inputs, [{"line": "l0"}, {"line": "l1-changed"}, {"line": "l2"}])
    fifth, echoes = batch(program_a, "--json")
    assert echoes == ["A2:l0", "A2:l1-changed", "A2:l2"]
    assert (json.loads(fifth.stdout)["reused"], json.loads(fifth.stdout)["ran_because"]) == (2, {"input_changed": 1})
    # And --fresh runs every line again
    fresh, echoes = batch(program_a, "--json", "--fresh")
    assert echoes == ["A2:l0", "A2:l1-changed", "A2:l2"]
    assert (json.loads(fresh.stdout)["reused"], json.loads(fresh.stdout)["ran_because"]) == (0, {"fresh": 3})
    assert side_channel(key, "finished") == {
        "A:l0": 1, "A:l1": 1, "A:l2": 1, "B:l0": 1, "B:l1": 1, "B:l2": 1,
        "A2:l0": 2, "A2:l1": 1, "A2:l2": 2, "A2:l1-changed": 2,
    }


def test_submit_batch_reuses_previous_lines_of_the_same_program_version_only(cluster: Cluster) -> None:
    key = f"{cluster.settings.namespace}:api-versions"
    rows = [{"line": f"p{index}"} for index in range(3)]
    program_a, program_b = Program.from_dict(tagger(key, tag="A")), Program.from_dict(tagger(key, name="b", tag="B"))
    app = cluster.runtime.app
    first = submit_batch(program_a, rows, app=app).get()
    # Another program given A's lines as previous ones runs every line, with its own outputs
    other = submit_batch(program_b, rows, app=app, previous=first.lines).get()
    assert [line.outputs["echo"] for line in other.lines] == ["B:p0", "B:p1", "B:p2"]
    assert (other.ran, other.reused, other.ran_because) == (3, 0, {"other_version": 3})
    # A given both runs' lines reuses its own (even though B's came later)
    again = submit_batch(program_a, rows, app=app, previous=[*first.lines, *other.lines]).get()
    assert [line.outputs["echo"] for line in again.lines] == ["A:p0", "A:p1", "A:p2"]
    assert (again.ran, again.reused) == (0, 3)
    # fresh=True ignores them
    fresh = submit_batch(program_a, rows, app=app, previous=first.lines, fresh=True).get()
    assert (fresh.ran, fresh.reused, fresh.ran_because) == (3, 0, {"fresh": 3})
    assert side_channel(key, "finished") == {"A:p0": 2, "A:p1": 2, "A:p2": 2, "B:p0": 1, "B:p1": 1, "B:p2": 1}


def test_a_line_whose_killed_client_only_claimed_its_cancel_runs_again(cluster: Cluster) -> None:
    key = f"{cluster.settings.namespace}:claimed-cancel"
    program, rows, app = Program.from_dict(tagger(key, tag="C", seconds=0.5)), [{"line": "c0"}], cluster.runtime.app
    first = submit_batch(program, rows, app=app).get()
    # Given an earlier run's line whose client claimed the cancel of its execution and died before publishing it
    execution_id = submit_program(program, rows[0], app=app).execution_id
    assert cluster.runtime.store.claim_finish(execution_id, "cancelled", "interrupted")
    submitted = dataclasses.replace(first.lines[0], status="submitted", execution_id=execution_id, outputs=None)
    # When the batch runs again with that line as the previous one
    started = time.monotonic()
    again = submit_batch(program, rows, app=app, previous=[submitted]).get()
    # Then the line runs again in a new execution (it is not waited for, nor ends "cancelled")
    line = again.lines[0]
    assert (line.status, line.outputs) == ("succeeded", {"echo": "C:c0"}), line
    assert line.execution_id not in (execution_id, first.lines[0].execution_id)
    assert time.monotonic() - started < 8  # no wait for a client takeover (10 s)


def start_batch(
    cluster: Cluster, program: Path, inputs: Path, output: Path, max_in_flight: int
) -> subprocess.Popen[str]:
    args = [CLI, "run", str(program), "--inputs-file", str(inputs), "--output", str(output),
            "--max-in-flight", str(max_in_flight)]
    return subprocess.Popen(args, cwd=ROOT, env=cluster.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_ctrl_c_cancels_the_lines_in_flight_and_a_rerun_resumes(cluster: Cluster, tmp_path: Path) -> None:
    key = f"{cluster.settings.namespace}:sigint"
    program = write_tagger(tmp_path, key, tag="S", seconds=0.5)
    inputs = write_inputs(tmp_path / "data.jsonl", [{"line": f"s{index}"} for index in range(30)])
    output, journal = tmp_path / "out.jsonl", tmp_path / "out.jsonl.partial"
    # Given a batch run on real workers, 4 lines in flight, interrupted (SIGINT) once 4 lines are done
    client = start_batch(cluster, program, inputs, output, max_in_flight=4)
    deadline = time.monotonic() + 60
    while finished_in(journal) < 4 and client.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    client.send_signal(signal.SIGINT)
    _, stderr = client.communicate(timeout=30)
    # Then it exits 130, saying how many lines it cancelled and that a re-run resumes
    assert client.returncode == 130, stderr
    records = journal_records(journal)
    cancelled = {record["index"] for record in records if record["status"] == "cancelled"}
    succeeded = {record["index"] for record in records if record["status"] == "succeeded"}
    assert cancelled and succeeded
    assert f"cancelled {len(cancelled)} running line" in stderr and "re-run the same command to resume" in stderr
    assert not output.exists()
    # And the cancelled lines' executions ended cancelled, as `dspex-celery cancel` ends them
    for record in records:
        if record["status"] == "cancelled":
            assert cluster.runtime.store.meta(record["execution_id"])["status"] == "cancelled"
    # And lines not started then never run (nothing starts once the client left)
    started = side_channel(key, "started")
    time.sleep(1.5)
    assert side_channel(key, "started") == started
    journaled = {record["index"] for record in records}
    assert {int(name.removeprefix("S:s")) for name in started} <= journaled and len(journaled) < 30
    # When the same command runs again, it reuses the lines done, reruns the cancelled ones and the rest
    rerun = cluster.cli("run", str(program), "--inputs-file", str(inputs), "--output", str(output), "--json")
    assert rerun.returncode == 0, rerun.stderr
    assert [line["outputs"]["echo"] for line in read_output(output)] == [f"S:s{index}" for index in range(30)]
    summary = json.loads(rerun.stdout)
    assert (summary["reused"], summary["ran"]) == (len(succeeded), 30 - len(succeeded))
    assert summary["ran_because"] == {"cancelled": len(cancelled), "new": 30 - len(succeeded) - len(cancelled)}
    started = side_channel(key, "started")
    assert all(started[f"S:s{index}"] == 1 for index in range(30) if index not in cancelled)


def test_a_second_ctrl_c_leaves_at_once_and_a_rerun_still_resumes(cluster: Cluster, tmp_path: Path) -> None:
    key = f"{cluster.settings.namespace}:sigint-twice"
    program = write_tagger(tmp_path, key, tag="T", seconds=1.0)
    inputs = write_inputs(tmp_path / "data.jsonl", [{"line": f"t{index}"} for index in range(24)])
    output, journal = tmp_path / "out.jsonl", tmp_path / "out.jsonl.partial"
    # Given a batch with 24 lines in flight, interrupted once
    client = start_batch(cluster, program, inputs, output, max_in_flight=24)
    wait_for(lambda: journal.exists() and len({r["index"] for r in journal_records(journal)}) == 24, timeout=60,
             what="24 lines submitted")
    client.send_signal(signal.SIGINT)
    assert client.stderr is not None
    assert client.stderr.readline().startswith("interrupted: cancelling 24 lines in flight")
    # When Ctrl-C comes again while it cancels
    client.send_signal(signal.SIGINT)
    _, stderr = client.communicate(timeout=10)
    # Then it leaves at once, exit 130
    assert client.returncode == 130 and "interrupted again: left at once" in stderr, stderr
    # And a re-run still completes every line with its own outputs
    rerun = cluster.cli("run", str(program), "--inputs-file", str(inputs), "--output", str(output), "--json")
    assert rerun.returncode == 0, rerun.stderr
    assert [line["outputs"]["echo"] for line in read_output(output)] == [f"T:t{index}" for index in range(24)]
    summary = json.loads(rerun.stdout)
    assert summary["ran"] + summary["reattached"] + summary["reused"] == 24


def test_a_batchs_plan_is_read_once_per_worker_process_not_once_per_line(cluster: Cluster) -> None:
    # Given a batch of 24 lines of a plan no worker has seen, on 4 worker processes (3 prefork
    # children and a threads worker), watched with MONITOR
    program = Program.from_dict(rag_program("plan_once", counter=counter(cluster, "plan_once")))
    namespace, finished = cluster.settings.namespace, threading.Event()
    outcome: dict[str, Any] = {}

    def run() -> None:
        outcome["result"] = submit_batch(program, dataset(24), app=cluster.runtime.app, max_in_flight=6).get()
        finished.set()

    reads = []
    with cluster.runtime.store.client.monitor() as monitor:
        threading.Thread(target=run, daemon=True).start()
        for command in monitor.listen():
            text = command["command"]
            if text.startswith(f"GET {namespace}:x:") and text.endswith(":plan"):
                reads.append(text)
            if finished.is_set() or len(reads) > 24:
                break
    # Then every line succeeded, and a worker process read the plan for its first line only: the
    # next lines' messages name the plan's digest, which it knows
    assert all(line.succeeded for line in outcome["result"].lines)
    assert 1 <= len(reads) <= 4, reads
