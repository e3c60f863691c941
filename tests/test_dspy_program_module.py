"""A Program is a dspy.Module: DSPy's batch, acall, Evaluate, save/load and optimizers on real workers."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import dspy
import pytest
from dspy.utils import DummyLM

from dspex_celery import Program, Settings, create_runtime
from dspex_celery.testing import fresh_namespace
from tests.conftest import Cluster
from tests.modules import dspy_program_mods as qa
from tests.modules.dspy_program_mods import BOOTSTRAPPED_ANSWER, COMPILED_ANSWER

pytestmark = pytest.mark.integration

QUESTIONS = ["what is redis?", "what is celery?", "what is dspy?", "what is a chord?"]


@pytest.fixture(scope="module")
def cluster(make_cluster) -> Cluster:
    """One threads worker with 8 slots (dspy.Evaluate runs 8 programs at once)."""
    cluster = make_cluster()
    cluster.start_worker("default", concurrency=8, pool="threads")
    return cluster


def on(cluster: Cluster) -> Any:
    """The qa Program, running on ``cluster``."""
    return Program.from_dict(qa.qa_program()).using(app=cluster.runtime.app)


def lm_calls(cluster: Cluster) -> dict[int, int]:
    """LM calls per worker process, as the workers' adapters counted them."""
    counts = cluster.runtime.store.client.hgetall(f"{cluster.settings.namespace}:lm-calls")
    return {int(pid): int(count) for pid, count in counts.items()}


def examples(labels: list[str] | None = None) -> list[dspy.Example]:
    answers = labels or [qa.ANSWERS[q.split()[-1].rstrip("?")]["answer"] for q in QUESTIONS]
    return [dspy.Example(question=q, answer=a).with_inputs("question") for q, a in zip(QUESTIONS, answers, strict=True)]


def test_program_is_a_dspy_module_whose_predictors_are_its_modules() -> None:
    program = Program.from_dict(qa.qa_program())
    assert isinstance(program, dspy.Module)
    # Only the dspy.Module module has predictors; named MODULE.PATH
    assert [name for name, _ in program.named_predictors()] == ["answer.predict"]
    program.predictors()[0].demos = [qa.demo()]
    # reset_copy clears the copy's demos, deepcopy keeps them, neither touches the original
    assert program.reset_copy().predictors()[0].demos == []
    copied = program.deepcopy()
    assert copied.predictors()[0].demos == [qa.demo()] and copied.predictors()[0] is not program.predictors()[0]
    assert program.predictors()[0].demos == [qa.demo()]


def test_batch_and_acall_run_on_the_workers(cluster: Cluster) -> None:
    program = on(cluster)
    # Module.batch: DSPy's thread pool, each call an execution on the cluster
    predictions = program.batch(examples(), num_threads=4, disable_progress_bar=True)
    assert [p.answer for p in predictions] == [e.answer for e in examples()]
    calls = lm_calls(cluster)
    assert sum(calls.values()) == len(QUESTIONS) and os.getpid() not in calls

    async def two_calls_and_a_ticker() -> tuple[list[Any], int]:
        ticks = 0
        calls = asyncio.gather(program.acall(question=QUESTIONS[0]), program.acall(question=QUESTIONS[1]))
        while not calls.done():  # the event loop keeps running while the executions do
            ticks += 1
            await asyncio.sleep(0.01)
        return await calls, ticks

    (first, second), ticks = asyncio.run(two_calls_and_a_ticker())
    assert (first.answer, second.answer) == (examples()[0].answer, examples()[1].answer)
    assert ticks >= 5


def test_evaluate_scores_as_in_process(cluster: Cluster) -> None:
    # Given a devset where two labels are wrong on purpose
    labels = [e.answer for e in examples()]
    devset = examples([labels[0], "wrong", labels[2], "also wrong"]) * 2
    evaluate = dspy.Evaluate(devset=devset, metric=qa.exact_match, num_threads=8, display_progress=False)
    # Then the Program on the cluster scores what the same module scores in-process
    expected = evaluate(qa.InProcessQA()).score
    assert 0 < expected < 100
    assert evaluate(on(cluster)).score == expected


def test_labeled_few_shot_demos_reach_the_workers(cluster: Cluster, tmp_path: Path) -> None:
    program = on(cluster)
    program.state_dir = tmp_path
    compiled = dspy.LabeledFewShot(k=1).compile(program, trainset=[qa.demo()])
    # The compiled copy's demo is in the workers' prompt; the uncompiled program is unchanged
    assert compiled(question="what is redis?").answer == COMPILED_ANSWER
    assert program(question="what is redis?").answer == examples()[0].answer
    assert [path.name.split("-")[0] for path in tmp_path.iterdir()] == ["answer"]  # saved once
    assert compiled(question="what is celery?").answer == COMPILED_ANSWER
    assert len(list(tmp_path.iterdir())) == 1


def test_save_and_load_round_trip_embedded(tmp_path: Path) -> None:
    # Given a compiled Program saved as DSPy saves a module
    compiled = dspy.LabeledFewShot(k=1).compile(Program.from_dict(qa.qa_program()), trainset=[qa.demo()])
    compiled.save(str(tmp_path / "qa.json"))
    # When a fresh Program loads it and runs in-process (embedded, no broker)
    fresh = Program.from_dict(qa.qa_program()).using(app=create_runtime(Settings(namespace=fresh_namespace("e"))).app)
    fresh.state_dir = tmp_path / "state"
    assert fresh.dump_state() != compiled.dump_state()
    fresh.load(str(tmp_path / "qa.json"))
    # Then it has the compiled state and answers with it
    assert fresh.dump_state() == compiled.dump_state()
    assert fresh(question="what is redis?").answer == COMPILED_ANSWER


def test_bootstrap_few_shot_bootstraps_demos_from_the_workers_traces(cluster: Cluster, tmp_path: Path) -> None:
    program = on(cluster)
    program.state_dir = tmp_path
    before = sum(lm_calls(cluster).values())
    optimizer = dspy.BootstrapFewShot(metric=qa.exact_match, max_bootstrapped_demos=1, max_labeled_demos=0,
                                      max_rounds=1)
    compiled = optimizer.compile(program, trainset=[qa.kombu_example(), *examples()])
    # The teacher's LM calls ran on the workers, and their trace made a bootstrapped demo: the
    # teacher's inputs (the lookup's facts, which no example has) and the LM's answer
    assert sum(lm_calls(cluster).values()) > before
    demos = compiled.predictors()[0].demos
    assert compiled._compiled and len(demos) == 1
    assert demos[0].augmented and demos[0].facts == ["kombu: a messaging library"]
    assert demos[0].answer == qa.kombu_example().answer
    # The workers run the compiled program with it (its answer's marker is in the prompt)
    assert compiled(question="what is redis?").answer == BOOTSTRAPPED_ANSWER
    assert program(question="what is redis?").answer == examples()[0].answer


def test_miprov2_compiles_against_the_cluster(cluster: Cluster, tmp_path: Path) -> None:
    # Given MIPROv2 whose instruction proposer is an in-process DummyLM (the program's LM is on the workers)
    proposer = DummyLM([{"proposed_instruction": "Answer from the facts.", "summary": "qa",
                         "observations": "facts", "program_description": "qa", "module_description": "answers"}] * 100)
    program = on(cluster)
    program.state_dir = tmp_path
    before = sum(lm_calls(cluster).values())
    optimizer = dspy.MIPROv2(metric=qa.exact_match, prompt_model=proposer, task_model=qa.lm(), auto=None,
                             num_candidates=2, num_threads=4, max_bootstrapped_demos=1, max_labeled_demos=1,
                             verbose=False)
    compiled = optimizer.compile(program, trainset=examples() * 2, valset=examples(), num_trials=2, minibatch=False)
    # Then its trials ran on the workers and the best program runs there with the in-process answer
    assert sum(lm_calls(cluster).values()) - before >= 2 * len(QUESTIONS)
    assert isinstance(compiled, type(program)) and compiled is not program
    assert compiled(question="what is redis?").answer == examples()[0].answer
