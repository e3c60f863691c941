"""Imperative dspy.Modules that ``dspex_celery.distribute`` runs unchanged (tests/test_distribute.py).

``Slow`` is a leaf sub-module (no sub-modules of its own: one call on a worker) that sleeps and counts
its calls in a Redis hash when given a counter; ``dspy.Predict`` calls use ``dummy_lm`` (DummyLM in
dict mode) with ``tests.modules.dspy_mods:inline_demos_adapter``, which puts demos in the last
message, so a compiled demo (with ``DEMO_MARKER``) changes the answer.
"""

from __future__ import annotations

import time
from typing import Any

import dspy
import redis
from dspy.utils import DummyLM

from dspex_celery.errors import TransientError
from dspex_celery.integrations.distribute import lazy_field

DEMO_MARKER = "DEMO-91c2"
COMPILED_ANSWER = "answered with the demo"
ANSWERS: dict[str, dict[str, str]] = {
    DEMO_MARKER: {"answer": COMPILED_ANSWER},
    "capital of france": {"answer": "Paris"},
    "[[ ## question ## ]]": {"answer": "unknown"},
}
LM = "tests.modules.dspy_imperative:dummy_lm"
ADAPTER = "tests.modules.dspy_mods:inline_demos_adapter"


def dummy_lm() -> DummyLM:
    return DummyLM(ANSWERS)


def count(counter: tuple[str | None, str | None], field: str) -> None:
    url, key = counter
    if url and key:
        redis.Redis.from_url(url).hincrby(key, field, 1)


class Slow(dspy.Module):
    """``label(text)`` appended to the previous call's text, after ``seconds``."""

    def __init__(self, label: str = "S", seconds: float = 0.0, counter_url: str | None = None,
                 counter_key: str | None = None) -> None:
        super().__init__()
        self.label, self.seconds, self.counter = label, seconds, (counter_url, counter_key)

    def forward(self, text: str, previous: Any = None) -> dspy.Prediction:
        count(self.counter, self.label)
        time.sleep(self.seconds)
        prior = previous.text if previous is not None else ""
        return dspy.Prediction(text=f"{prior}{self.label}({text})")


class TwoAndLoop(dspy.Module):
    """Two independent slow calls, a loop of dependent ones (each gets the last's lazy result), an
    LM call whose answer decides a branch, and a list of sub-modules."""

    def __init__(self, hops: int = 3, seconds: float = 0.0) -> None:
        super().__init__()
        self.hops = hops
        self.left = Slow("L", seconds)
        self.right = Slow("R", seconds)
        self.step = Slow("S")
        self.respond = dspy.Predict("question -> answer")
        self.critics = [Slow("C0"), Slow("C1")]

    def forward(self, question: str) -> dspy.Prediction:
        left = self.left(text=question)
        right = self.right(text=question)
        draft = None
        for _ in range(self.hops):
            draft = self.step(text=question, previous=draft)
        answer = self.respond(question=question).answer
        verdict = "known" if answer != "unknown" else "unknown"
        assert draft is not None
        critics = [critic(text=question).text for critic in self.critics]
        return dspy.Prediction(left=left.text, right=right.text, draft=draft.text, answer=answer, verdict=verdict,
                               critics=critics)


class Chain(dspy.Module):
    """``steps`` sequential slow calls, each waiting for the one before (for the replay test)."""

    def __init__(self, steps: int = 4, seconds: float = 0.3, counter_url: str | None = None,
                 counter_key: str | None = None) -> None:
        super().__init__()
        self.steps = steps
        self.step = Slow("C", seconds, counter_url, counter_key)

    def forward(self, text: str) -> dspy.Prediction:
        out = ""
        for index in range(self.steps):
            out = self.step(text=f"{text}{index}{out[-3:]}").text
        return dspy.Prediction(text=out)


class QA(dspy.Module):
    """One Predict; forward returns its (lazy) result as it is."""

    def __init__(self) -> None:
        super().__init__()
        self.respond = dspy.Predict("question -> answer")

    def forward(self, question: str) -> dspy.Prediction:
        return self.respond(question=question)


class NeedsArgs(dspy.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.respond = dspy.Predict("question -> answer")

    def forward(self, question: str) -> dspy.Prediction:
        return self.respond(question=question)


class NotJson(dspy.Module):
    """A leaf whose output is a set (not JSON)."""

    def forward(self, question: str) -> dspy.Prediction:
        return dspy.Prediction(words=set(question.split()))


class UsesNotJson(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.split = NotJson()

    def forward(self, question: str) -> dspy.Prediction:
        return dspy.Prediction(words=sorted(self.split(question=question).words))


def exact_answer(example: Any, prediction: Any, trace: Any = None) -> bool:
    return bool(example.answer == prediction.answer)


class FlakyOnce(dspy.Module):
    """Raises a TransientError on its first call (counted in Redis), then echoes."""

    def __init__(self, counter_url: str | None = None, counter_key: str | None = None) -> None:
        super().__init__()
        self.counter = (counter_url, counter_key)

    def forward(self, text: str) -> dspy.Prediction:
        url, key = self.counter
        if url and key and redis.Redis.from_url(url).hincrby(key, "flaky", 1) == 1:
            raise TransientError("first call fails")
        return dspy.Prediction(text=text.upper())


class UsesFlaky(dspy.Module):
    def __init__(self, counter_url: str | None = None, counter_key: str | None = None) -> None:
        super().__init__()
        self.echo = FlakyOnce(counter_url, counter_key)

    def forward(self, text: str) -> dspy.Prediction:
        return self.echo(text=text)


class Fanout(dspy.Module):
    """``width`` independent slow calls (a list of sub-modules), then one over their results."""

    def __init__(self, width: int = 8, seconds: float = 0.25) -> None:
        super().__init__()
        self.experts = [Slow(f"E{index}", seconds) for index in range(width)]
        self.merge = Slow("M")

    def forward(self, text: str) -> dspy.Prediction:
        drafts = [expert(text=text) for expert in self.experts]
        return dspy.Prediction(texts=[draft.text for draft in drafts], merged=self.merge(text=text).text)


class CountThenFlaky(dspy.Module):
    """A counted call, then one that fails the first time (for resuming an execution that failed)."""

    def __init__(self, counter_url: str | None = None, counter_key: str | None = None) -> None:
        super().__init__()
        self.count = Slow("K", 0.0, counter_url, counter_key)
        self.echo = FlakyOnce(counter_url, counter_key)

    def forward(self, text: str) -> dspy.Prediction:
        return self.echo(text=self.count(text=text).text)


class FieldChain(dspy.Module):
    """The second call takes one field of the first's result without waiting for it (lazy_field)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = Slow("F", 0.3)
        self.second = Slow("G")

    def forward(self, text: str) -> dspy.Prediction:
        first = self.first(text=text)
        return self.second(text=lazy_field(first, "text"))
