"""A DSPy Program for tests/test_dspy_program_module.py: a plain lookup, then a dspy.Predict module.

The LM is ``DummyLM`` in dict mode (the first ``ANSWERS`` key found in the prompt wins), with the
demos inline in the prompt (``InlineDemosAdapter``): a compiled demo's marker changes the answer.
On a worker the adapter counts LM calls per process in the Redis hash ``NAMESPACE:lm-calls``.
"""

from __future__ import annotations

import os
from typing import Any

import dspy
import redis
from dspy.utils import DummyLM

from tests.modules.dspy_mods import InlineDemosAdapter

#: A question in a demo: when a compiled demo reaches the worker, the prompt contains it.
DEMO_MARKER = "DEMO-b41c"
COMPILED_ANSWER = "Answered with the compiled demo."
#: In the LM's answer about kombu only: when a demo bootstrapped from that answer reaches the worker, the prompt has it.
BOOTSTRAP_MARKER = "BOOT-7f3e"
BOOTSTRAPPED_ANSWER = "Answered with the bootstrapped demo."
FACTS = {"redis": "an in-memory store", "celery": "a task queue", "dspy": "LM programs", "chord": "a group and a callback",
         "kombu": "a messaging library"}
ANSWERS: dict[str, dict[str, str]] = {
    DEMO_MARKER: {"answer": COMPILED_ANSWER},
    BOOTSTRAP_MARKER: {"answer": BOOTSTRAPPED_ANSWER},
    **{topic: {"answer": f"{topic} is {fact}"} for topic, fact in FACTS.items()},
    "[[ ## question ## ]]": {"answer": "I do not know."},
}
ANSWERS["kombu"] = {"answer": f"kombu is a messaging library ({BOOTSTRAP_MARKER})"}


def lookup(question: str) -> dict[str, Any]:
    """A plain function module: the facts whose topic the question names."""
    return {"facts": [f"{topic}: {fact}" for topic, fact in FACTS.items() if topic in question.lower()]}


class Answer(dspy.Module):
    """One ``dspy.Predict`` over ``question, facts -> answer``."""

    def __init__(self) -> None:
        super().__init__()
        self.predict = dspy.Predict("question: str, facts: list[str] -> answer: str")

    def forward(self, question: str, facts: list[str]) -> dspy.Prediction:
        return self.predict(question=question, facts=facts)


class CountingAdapter(InlineDemosAdapter):
    """``InlineDemosAdapter`` that counts the prompts it formats (one per LM call) per worker process."""

    def format(self, signature: Any, demos: list[dict[str, Any]], inputs: dict[str, Any]) -> list[dict[str, Any]]:
        url, namespace = os.environ.get("DSPEX_TEST_REDIS_URL"), os.environ.get("DSPEX_NAMESPACE")
        if url and namespace:
            redis.Redis.from_url(url).hincrby(f"{namespace}:lm-calls", str(os.getpid()), 1)
        return super().format(signature, demos, inputs)


def lm() -> DummyLM:
    return DummyLM(ANSWERS)


def adapter() -> CountingAdapter:
    return CountingAdapter()


def qa_program(resource: str = "default") -> dict[str, Any]:
    """The program: ``lookup`` (plain) -> ``answer`` (dspy.Module), outputs ``answer``."""
    return {
        "name": "qa",
        "inputs": ["question"],
        "dspy": {"lm": "tests.modules.dspy_program_mods:lm", "adapter": "tests.modules.dspy_program_mods:adapter"},
        "modules": {
            "lookup": {"uses": "tests.modules.dspy_program_mods:lookup", "inputs": {"question": "$inputs.question"}},
            "answer": {"uses": "tests.modules.dspy_program_mods:Answer", "resource": resource,
                       "inputs": {"question": "$inputs.question", "facts": "$lookup.facts"}},
        },
        "outputs": {"answer": "$answer.answer"},
    }


class InProcessQA(dspy.Module):
    """The same program as one in-process dspy.Module (the reference for scores)."""

    def __init__(self) -> None:
        super().__init__()
        self.answer = Answer()

    def forward(self, question: str) -> dspy.Prediction:
        with dspy.context(lm=lm(), adapter=adapter()):
            return self.answer(question=question, facts=lookup(question)["facts"])


def demo() -> dspy.Example:
    """A labeled example whose question carries the marker (a demo LabeledFewShot puts in the prompt)."""
    return dspy.Example(question=f"{DEMO_MARKER}: what is a chord?", answer="a group and a callback").with_inputs("question")


def kombu_example() -> dspy.Example:
    """A training example the LM answers right (its answer carries :data:`BOOTSTRAP_MARKER`)."""
    return dspy.Example(question="what is kombu?", answer=ANSWERS["kombu"]["answer"]).with_inputs("question")


def exact_match(example: Any, prediction: Any, trace: Any = None) -> bool:
    return bool(example.answer == prediction.answer)
