"""distribute(module): an unchanged imperative dspy.Module runs its sub-module calls on real workers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import dspy
import pytest
import redis
from click.testing import CliRunner

from dspex_celery import distribute
from dspex_celery.cli import cli
from dspex_celery.examples import multihop
from dspex_celery.integrations.distribute import CallFailed, resume_forward
from dspex_celery.results import ExecutionStatus, ModuleStatus, parse_time
from dspex_celery.testing import wait_for
from tests.conftest import ROOT, Cluster, HistoryCluster
from tests.modules import dspy_imperative as mods
from tests.modules.dspy_mods import inline_demos_adapter

pytestmark = pytest.mark.integration

QUESTION = "what is the capital of france?"
RESOURCES = {"left": "io", "*": "llm"}


@pytest.fixture(scope="module")
def cluster(make_cluster) -> Cluster:
    """A prefork `io` worker and a threads `default`+`llm` worker (dspy.context is per thread)."""
    cluster = make_cluster()
    cluster.start_worker("io", concurrency=2)
    cluster.start_worker("default", "llm", concurrency=8, pool="threads")
    return cluster


def in_process(module: Any, **inputs: Any) -> Any:
    with dspy.context(lm=mods.dummy_lm(), adapter=inline_demos_adapter()):
        return module(**inputs)


def distributed(cluster: Cluster, module: Any, **options: Any) -> Any:
    return distribute(module, lm=mods.LM, adapter=mods.ADAPTER, resources=RESOURCES, app=cluster.runtime.app,
                      **options)


def interval(record: Any) -> tuple[float, float]:
    return parse_time(record.started_at).timestamp(), parse_time(record.finished_at).timestamp()


def test_independent_calls_overlap_and_dependent_loop_gives_the_in_process_answer(cluster: Cluster) -> None:
    # Given a module with two independent slow calls, a loop of dependent ones and an LM call
    module = mods.TwoAndLoop(hops=3, seconds=0.8)
    expected = in_process(module, question=QUESTION)
    # When it runs distributed under a known execution id
    execution_id = os.urandom(8).hex()
    result = distributed(cluster, module, with_={"hops": 3, "seconds": 0.8}).run(execution_id, question=QUESTION)
    # Then it returns what the module returns in-process
    assert result == expected
    store = cluster.runtime.store
    records = store.records(execution_id)
    assert set(records) == {"left.0", "right.0", "step.0", "step.1", "step.2", "respond.0", "critics[0].0",
                            "critics[1].0"}
    assert all(record.status is ModuleStatus.SUCCEEDED for record in records.values())
    # And the two independent calls overlapped, on two worker processes of their resource classes
    (left_start, left_end), (right_start, right_end) = interval(records["left.0"]), interval(records["right.0"])
    assert left_start < right_end and right_start < left_end
    assert records["left.0"].resource == "io" and records["right.0"].resource == "llm"
    assert records["left.0"].worker != records["right.0"].worker
    # And each step waited for the one before it (a dependency, in the stored plan of the execution)
    plan = store.plan(execution_id)
    assert plan is not None and plan.modules["step.2"].parents == ("step.1",)
    assert interval(records["step.1"])[0] >= interval(records["step.0"])[1]
    assert store.meta(execution_id)["status"] == ExecutionStatus.SUCCEEDED.value


def test_labeled_few_shot_demos_reach_the_workers_and_save_load_keeps_them(cluster: Cluster, tmp_path: Path) -> None:
    # Given a distributed QA module compiled by LabeledFewShot with one demo carrying the marker
    demo = dspy.Example(question=f"{mods.DEMO_MARKER}: a demo", answer="demo answer").with_inputs("question")
    student = distributed(cluster, mods.QA())
    compiled = dspy.LabeledFewShot(k=1).compile(student, trainset=[demo])
    # Then the workers see the demo in the prompt (the LM answers differently), as in-process
    assert compiled(question=QUESTION).answer == mods.COMPILED_ANSWER
    assert in_process(compiled.module, question=QUESTION).answer == mods.COMPILED_ANSWER
    assert student(question=QUESTION).answer == "Paris"  # the uncompiled one is unchanged
    # And save/load keep the wrapped module's state keys: a plain QA loads it, and so does a new wrapper
    compiled.save(str(tmp_path / "qa.json"))
    plain = mods.QA()
    plain.load(str(tmp_path / "qa.json"))
    assert in_process(plain, question=QUESTION).answer == mods.COMPILED_ANSWER
    reloaded = distributed(cluster, mods.QA())
    reloaded.load(str(tmp_path / "qa.json"))
    assert reloaded(question=QUESTION).answer == mods.COMPILED_ANSWER


def test_bootstrap_few_shot_compiles_from_traces_of_calls_run_on_workers(cluster: Cluster) -> None:
    # Given a trainset whose question carries the marker (the LM answers it with the label)
    train = [dspy.Example(question=f"{mods.DEMO_MARKER}: capital?", answer=mods.COMPILED_ANSWER).with_inputs("question")]
    student = distributed(cluster, mods.QA())
    # When BootstrapFewShot compiles the distributed module (the teacher's calls run on the workers)
    optimizer = dspy.BootstrapFewShot(metric=mods.exact_answer, max_bootstrapped_demos=1, max_labeled_demos=0)
    compiled = optimizer.compile(student, trainset=train)
    # Then the workers' trace became the demo, and the compiled module answers with it
    demos = compiled.module.respond.demos
    assert [demo.question for demo in demos] == [train[0].question] and demos[0].augmented
    assert compiled(question=QUESTION).answer == mods.COMPILED_ANSWER


def test_miprov2_compiles_a_distributed_module(cluster: Cluster) -> None:
    # Given MIPROv2 whose instruction proposer is an in-process DummyLM (the module's calls run on the workers)
    proposer = dspy.utils.DummyLM([{"proposed_instruction": "Answer the question.", "summary": "qa",
                                    "observations": "capitals", "program_description": "qa",
                                    "module_description": "answers"}] * 100)
    train = [dspy.Example(question=f"{mods.DEMO_MARKER}: capital?", answer=mods.COMPILED_ANSWER).with_inputs("question")]
    student = distributed(cluster, mods.QA())
    optimizer = dspy.MIPROv2(metric=mods.exact_answer, prompt_model=proposer, task_model=mods.dummy_lm(),
                             auto=None, num_candidates=2, num_threads=4, max_bootstrapped_demos=1,
                             max_labeled_demos=1, verbose=False)
    compiled = optimizer.compile(student, trainset=train * 4, valset=train * 2, num_trials=2, minibatch=False)
    # Then the best candidate is a distributed module too, and on the workers it answers as in-process
    assert compiled is not student and type(compiled) is type(student)
    assert compiled(question=QUESTION).answer == in_process(compiled.module, question=QUESTION).answer


def test_evaluate_batch_and_acall_match_in_process(cluster: Cluster) -> None:
    # Given eight questions, some of which the LM answers as labelled
    devset = [dspy.Example(question=f"{QUESTION} #{index}" if index % 2 else f"who knows #{index}",
                           answer="Paris").with_inputs("question") for index in range(8)]
    module = distributed(cluster, mods.QA())
    # When dspy.Evaluate scores it with eight threads
    remote = dspy.Evaluate(devset=devset, metric=mods.exact_answer, num_threads=8)(module)
    with dspy.context(lm=mods.dummy_lm(), adapter=inline_demos_adapter()):
        local = dspy.Evaluate(devset=devset, metric=mods.exact_answer, num_threads=8)(mods.QA())
    # Then it scores as in-process (half of them)
    assert remote.score == local.score == 50.0
    # And Module.batch and acall give the in-process predictions
    batch = module.batch(devset[:4], num_threads=4)
    assert [prediction.answer for prediction in batch] == ["unknown", "Paris", "unknown", "Paris"]
    assert asyncio.run(module.acall(question=QUESTION)).answer == "Paris"


CLIENT = textwrap.dedent("""
    import sys
    from dspex_celery import create_runtime, distribute, load_settings
    from tests.modules.dspy_imperative import Chain
    url, key, execution_id = sys.argv[1:]
    options = {"steps": 4, "seconds": 0.5, "counter_url": url, "counter_key": key}
    app = create_runtime(load_settings()).app
    distribute(Chain(**options), with_=options, resources={"*": "llm"}, app=app).run(execution_id, text="x")
""")


def test_killed_client_resumes_without_calling_finished_calls_again(cluster: Cluster, redis_url: str) -> None:
    # Given a client running four sequential calls under a known execution id
    execution_id, key = "crash-" + os.urandom(4).hex(), f"{cluster.settings.namespace}:test:calls"
    counter = redis.Redis.from_url(redis_url, decode_responses=True)
    client = subprocess.Popen([sys.executable, "-c", CLIENT, redis_url, key, execution_id], cwd=ROOT,
                              env=cluster.env(PYTHONPATH=str(ROOT)))
    try:
        # When it is killed once two calls ran
        wait_for(lambda: int(counter.hget(key, "C") or 0) >= 2 or client.poll() is not None, 30, "two calls")
        client.send_signal(signal.SIGKILL)
        client.wait(10)
    finally:
        if client.poll() is None:
            client.kill()
    assert client.returncode == -signal.SIGKILL
    # And the execution is resumed from another process (`dspex-celery resume`, run in this one)
    env = {key: value for key, value in cluster.env().items() if key.startswith("DSPEX_")}
    resumed = CliRunner(env=env).invoke(cli, ["resume", execution_id, "--json"])
    # Then it returns the in-process answer and no call ran twice (four calls in all)
    assert resumed.exit_code == 0, resumed.output
    expected = in_process(mods.Chain(steps=4, seconds=0.0), text="x")
    assert json.loads(resumed.stdout)["outputs"] == dict(expected.toDict())
    assert int(counter.hget(key, "C") or 0) == 4
    # And resuming it again (it succeeded) calls nothing
    assert resume_forward(execution_id, app=cluster.runtime.app) == expected
    assert int(counter.hget(key, "C") or 0) == 4
    assert cluster.runtime.store.meta(execution_id)["status"] == ExecutionStatus.SUCCEEDED.value


def test_cli_runs_a_module_reference_and_a_batch(cluster: Cluster, tmp_path: Path) -> None:
    # When the CLI runs a module class by reference with constructor arguments and an LM factory
    done = cluster.cli("run", "tests.modules.dspy_imperative:TwoAndLoop", "-i", f"question={QUESTION}",
                       "--lm", mods.LM, "--adapter", mods.ADAPTER, "--with", "hops=2", "--json")
    # Then it prints what the module returns in-process
    assert done.returncode == 0, done.stderr
    expected = in_process(mods.TwoAndLoop(hops=2), question=QUESTION)
    assert json.loads(done.stdout)["outputs"] == dict(expected.toDict())
    # And --inputs-file runs one forward per line, scoring the labels (keys forward does not take)
    lines = tmp_path / "questions.jsonl"
    lines.write_text("".join(json.dumps({"question": q, "answer": "Paris"}) + "\n" for q in (QUESTION, "who knows?")))
    env = {key: value for key, value in cluster.env().items() if key.startswith("DSPEX_")}
    batch = CliRunner(env=env).invoke(cli, ["run", "tests.modules.dspy_imperative:QA", "--inputs-file", str(lines),
                                            "--lm", mods.LM, "--metric", "tests.modules.dspy_imperative:exact_answer",
                                            "--json"])
    assert batch.exit_code == 0, batch.output
    assert {"succeeded": 2, "score": 50.0}.items() <= json.loads(batch.stdout).items()
    results = [json.loads(text) for text in (tmp_path / "questions.results.jsonl").read_text().splitlines()]
    assert [result["outputs"]["answer"] for result in results] == ["Paris", "unknown"]


@pytest.mark.parametrize(("reference", "args", "fragment"), [
    ("tests.modules.dspy_imperative:count", (), "is not a dspy.Module class"),
    ("tests.modules.dspy_imperative:NeedsArgs", (), "pass its constructor's arguments with --with"),
    ("dspex_celery.examples.dspy_rag:Generate", (), "outside the allow-list"),
    ("tests.modules.dspy_imperative:UsesNotJson", (), "output 'words' is not JSON-serialisable"),
    ("tests.modules.dspy_imperative:QA", ("--strategy", "dag"), "--strategy applies to a program file only"),
    ("tests.modules.dspy_imperative:QA", ("--lm", "tests.modules.dspy_imperative:no_such_lm"),
     "lm factory 'tests.modules.dspy_imperative:no_such_lm' cannot be imported"),
])
def test_cli_bad_module_references_get_one_line(cluster: Cluster, reference: str, args: tuple[str, ...],
                                                fragment: str) -> None:
    # (in this process: the CLI's own code, four cold starts saved)
    env = {key: value for key, value in cluster.env(DSPEX_MODULES="tests.modules").items() if key.startswith("DSPEX_")}
    done = CliRunner(env=env).invoke(cli, ["run", reference, "-i", "question=a b", *args])
    assert done.exit_code == 2, done.output
    assert done.stderr.startswith("error: ") and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert fragment in done.stderr


def test_a_transient_failure_of_a_call_is_retried_like_any_module(cluster: Cluster, redis_url: str) -> None:
    options = {"counter_url": redis_url, "counter_key": f"{cluster.settings.namespace}:test:flaky"}
    execution_id = os.urandom(8).hex()
    module = distributed(cluster, mods.UsesFlaky(**options), with_=options, retry={"max_attempts": 2, "backoff_s": 0})
    assert module.run(execution_id, text="hi").text == "HI"
    record = cluster.runtime.store.record(execution_id, "echo.0")
    assert (record.status, record.attempts) == (ModuleStatus.SUCCEEDED, 2)


def test_a_failed_execution_resumed_reuses_its_finished_calls(cluster: Cluster, redis_url: str) -> None:
    # Given an execution whose second call failed (no retries)
    key = f"{cluster.settings.namespace}:test:resume-failed"
    options = {"counter_url": redis_url, "counter_key": key}
    execution_id = os.urandom(8).hex()
    module = distributed(cluster, mods.CountThenFlaky(**options), with_=options, retry={"max_attempts": 1})
    with pytest.raises(CallFailed, match="echo.0"):
        module.run(execution_id, text="hi")
    # When it is resumed
    assert resume_forward(execution_id, app=cluster.runtime.app).text == "K(HI)"
    # Then the first call was reused (called once in all), the failed one ran again
    counter = redis.Redis.from_url(redis_url, decode_responses=True)
    assert counter.hgetall(key) == {"K": "1", "flaky": "2"}


def test_calls_are_modules_of_the_execution_in_history(cluster: Cluster, redis_url: str, tmp_path: Path) -> None:
    # Given a listener writing this cluster's history
    history = HistoryCluster(cluster, f"sqlite:///{tmp_path / 'history.db'}", redis_url)
    history.start_listener()
    try:
        # When a distributed module runs from a client that records history
        execution_id = os.urandom(8).hex()
        module = distribute(mods.TwoAndLoop(hops=2), lm=mods.LM, adapter=mods.ADAPTER, with_={"hops": 2},
                            app=history.runtime.app)
        module.run(execution_id, question=QUESTION)
        # Then history has the execution with one module per call (a worker's last record may reach
        # the listener after the client's finish event: wait for it)
        history.recorded(execution_id)
        recorded = wait_for(lambda: (result := history.history.result(execution_id)) is not None
                            and "critics[1].0" in result.modules and result, 20, "every call in history")
    finally:
        history.stop()
    assert recorded.program == "TwoAndLoop" and recorded.status is ExecutionStatus.SUCCEEDED
    assert {"left.0", "step.1", "respond.0", "critics[1].0"} <= set(recorded.modules)
    assert all(record.status is ModuleStatus.SUCCEEDED for record in recorded.modules.values())


def test_a_lazy_field_passed_to_another_call_is_a_dependency(cluster: Cluster) -> None:
    execution_id = os.urandom(8).hex()
    assert distributed(cluster, mods.FieldChain()).run(execution_id, text="x") == in_process(mods.FieldChain(), text="x")
    plan = cluster.runtime.store.plan(execution_id)
    assert plan is not None and plan.modules["second.0"].parents == ("first.0",)


def test_a_failed_call_raises_when_read(cluster: Cluster) -> None:
    with pytest.raises(CallFailed, match="not JSON-serialisable"):
        distributed(cluster, mods.UsesNotJson())(question="a b")


def test_the_multihop_tutorial_example_runs_unchanged_as_in_process(cluster: Cluster) -> None:
    options = {"num_docs": 2, "num_hops": 2}
    claim = "Celery chords need a result backend"
    with dspy.context(lm=multihop.offline_lm()):
        expected = multihop.Hop(**options)(claim=claim)
    hop = distribute(multihop.Hop(**options), lm="dspex_celery.examples.multihop:offline_lm", with_=options,
                     resources={"*": "llm"}, app=cluster.runtime.app)
    assert hop(claim=claim) == expected
