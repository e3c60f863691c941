"""DSPy modules, LM and adapter factories for the DSPy and batch tests (real dspy, DummyLM).

The LM is ``dspy.utils.DummyLM`` in dict mode: it answers with the first ``ANSWERS`` key found in
the last prompt message, so answers are the same on every worker and pool process. The
``InlineDemosAdapter`` (a ``ChatAdapter``) puts few-shot demos inside that last message, so
demos loaded from a state file change what DummyLM matches.
"""

from __future__ import annotations

from typing import Any

import dspy
import redis
from dspy.utils import DummyLM

CORPUS = {
    "redis": "Redis is an in-memory data store used as a Celery broker.",
    "celery": "Celery is a distributed task queue for Python.",
    "dspy": "DSPy compiles programs of language-model modules.",
    "chord": "A chord runs a group of tasks and then a callback.",
}
#: A question in a demo of the compiled state: when the demos are loaded, the prompt contains it.
DEMO_MARKER = "DEMO-7f3a"
COMPILED_ANSWER = "Answered with the compiled demos."
ANSWERS: dict[str, dict[str, str]] = {
    DEMO_MARKER: {"reasoning": "A demo is in the prompt.", "answer": COMPILED_ANSWER},
    "redis": {"reasoning": "The context is about Redis.", "answer": "Redis stores data in memory."},
    "celery": {"reasoning": "The context is about Celery.", "answer": "Celery runs tasks on workers."},
    "[[ ## question ## ]]": {"reasoning": "Nothing matched.", "answer": "I do not know."},
}


def counter_incr(url: str | None, key: str | None, field: str) -> int:
    """Count one call in the Redis hash ``key`` (a side channel the tests read); 0 when unset."""
    if not url or not key:
        return 0
    return int(redis.Redis.from_url(url).hincrby(key, field, 1))


class Retrieve(dspy.Module):
    """Passages whose id appears in the question; counts calls when given a Redis ``counter``."""

    def __init__(self, k: int = 2, counter_url: str | None = None, counter_key: str | None = None) -> None:
        super().__init__()
        self.k = k
        self.counter = (counter_url, counter_key)

    def forward(self, question: str) -> dspy.Prediction:
        calls = counter_incr(*self.counter, question)
        if "FAIL-ONCE" in question and calls == 1:
            raise ValueError(f"first call fails: {question}")
        ids = [doc for doc in CORPUS if doc in question.lower()][: self.k]
        return dspy.Prediction(passages=[CORPUS[doc] for doc in ids], ids=ids, query=question)


class GenerateAnswer(dspy.Signature):
    """Answer the question using the context."""

    context: list[str] = dspy.InputField()
    question: str = dspy.InputField()
    answer: str = dspy.OutputField()


class Generate(dspy.Module):
    """ChainOfThought over ``GenerateAnswer`` (outputs ``reasoning`` and ``answer``)."""

    def __init__(self) -> None:
        super().__init__()
        self.respond = dspy.ChainOfThought(GenerateAnswer)

    def forward(self, question: str, context: list[str]) -> dspy.Prediction:
        return self.respond(question=question, context=context)


class InlineDemosAdapter(dspy.ChatAdapter):
    """A ChatAdapter that sends demos and the request as one user message after the system one."""

    def format(self, signature: Any, demos: list[dict[str, Any]], inputs: dict[str, Any]) -> list[dict[str, Any]]:
        system, *turns = super().format(signature, demos, inputs)
        return [system, {"role": "user", "content": "\n\n".join(str(turn["content"]) for turn in turns)}]


def dummy_lm() -> DummyLM:
    return DummyLM(ANSWERS)


def inline_demos_adapter() -> InlineDemosAdapter:
    return InlineDemosAdapter()


def broken_lm() -> DummyLM:
    raise RuntimeError("no API key configured")


def not_an_lm() -> int:
    return 42


class RateLimitedOnce(dspy.Module):
    """Raises the OpenAI client's RateLimitError on its first call (counted in Redis), then answers."""

    def __init__(self, counter_url: str, counter_key: str) -> None:
        super().__init__()
        self.counter = (counter_url, counter_key)

    def forward(self, question: str) -> dspy.Prediction:
        if counter_incr(*self.counter, "calls") == 1:
            import httpx
            import openai

            response = httpx.Response(429, request=httpx.Request("POST", "http://127.0.0.1/v1/chat"))
            raise openai.RateLimitError("rate limit reached", response=response, body=None)
        return dspy.Prediction(answer=f"ok: {question}")


def rag_program(name: str = "dspy_rag", *, state: str | None = None, counter: tuple[str, str] | None = None,
                resource: str = "default") -> dict[str, Any]:
    """The two-module DSPy RAG program the tests run (``state`` loads compiled demos into generate)."""
    retrieve: dict[str, Any] = {"uses": "tests.modules.dspy_mods:Retrieve", "inputs": {"question": "$inputs.question"}}
    if counter is not None:
        retrieve["with"] = {"counter_url": counter[0], "counter_key": counter[1]}
    generate: dict[str, Any] = {
        "uses": "tests.modules.dspy_mods:Generate",
        "inputs": {"question": "$inputs.question", "context": "$retrieve.passages"},
        "resource": resource,
    }
    if state is not None:
        generate["state"] = state
    return {
        "name": name,
        "inputs": ["question"],
        "dspy": {"lm": "tests.modules.dspy_mods:dummy_lm", "adapter": "tests.modules.dspy_mods:inline_demos_adapter"},
        "modules": {"retrieve": retrieve, "generate": generate},
        "outputs": {"answer": "$generate.answer", "reasoning": "$generate.reasoning", "query": "$retrieve.query"},
    }


def compiled_state(path: str) -> str:
    """Save ``Generate`` compiled by ``LabeledFewShot`` with one demo whose question is the marker."""
    demo = dspy.Example(
        question=f"{DEMO_MARKER}: what is a chord?", context=[CORPUS["chord"]],
        reasoning="The context defines it.", answer="A group and a callback.",
    ).with_inputs("question", "context")
    dspy.LabeledFewShot(k=1).compile(Generate(), trainset=[demo]).save(path)
    return path


def exact_match(example: Any, prediction: Any, trace: Any = None) -> bool:
    """A DSPy-style metric: the predicted answer equals the line's ``answer`` label."""
    return bool(example.answer == prediction.answer)
