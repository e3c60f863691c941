"""A DSPy LM that counts its calls and reports token usage, for the LM cache and usage tests.

``counting_lm`` is a ``dspy.LM`` over a custom engine (DSPy's canonical engine interface, no
network): it answers ``[[ ## answer ## ]]`` with the question reversed, reports usage of
``prompt_tokens`` = words in the request and ``completion_tokens`` = words in the answer, and adds
one call and those tokens to the Redis hash named by ``DSPEX_TEST_LM_COUNTER`` (on
``DSPEX_TEST_REDIS_URL``): what the LM was really asked and what it reported, as the tests read it.
Unlike ``DummyLM`` (which never caches), its requests go through ``dspy.cache``.
"""

from __future__ import annotations

import os
import time
from types import SimpleNamespace
from typing import Any

import dspy
import redis
from dspy.lm15 import Message, Response, TextPart, Usage

from dspex_celery.errors import TransientError

#: Seconds each LM call takes (``DSPEX_TEST_LM_LATENCY_S``; the benchmark sets it).
LATENCY_ENV = "DSPEX_TEST_LM_LATENCY_S"
COUNTER_ENV = "DSPEX_TEST_LM_COUNTER"


def _words(request: Any) -> int:
    system = request.system if isinstance(request.system, str) else "".join(p.text for p in request.system or ())
    return len(system.split()) + sum(len((message.text or "").split()) for message in request.messages)


class CountingEngine:
    """A canonical DSPy engine: ``complete(Request) -> Response`` with usage; counts calls in Redis."""

    def __init__(self) -> None:
        url, key = os.environ.get("DSPEX_TEST_REDIS_URL"), os.environ.get(COUNTER_ENV)
        self.counter = (redis.Redis.from_url(url), key) if url and key else None
        self.latency_s = float(os.environ.get(LATENCY_ENV, "0"))

    def complete(self, request: Any) -> Response:
        question = (request.messages[-1].text or "").split("[[ ## question ## ]]")[-1].split("\n\n")[0].strip()
        answer = " ".join(reversed(question.split())) or "nothing"
        text = f"[[ ## answer ## ]]\n{answer}\n\n[[ ## completed ## ]]"
        prompt, completion = _words(request), len(answer.split())
        if self.latency_s:
            time.sleep(self.latency_s)
        if self.counter is not None:
            client, key = self.counter
            pipe = client.pipeline()
            pipe.hincrby(key, "calls", 1)
            pipe.hincrby(key, "prompt_tokens", prompt)
            pipe.hincrby(key, "completion_tokens", completion)
            pipe.execute()
        return Response(id=None, model="counting", message=Message.assistant([TextPart(text)]), finish_reason="stop",
                        usage=Usage(input_tokens=prompt, output_tokens=completion, total_tokens=prompt + completion))

    def stream(self, request: Any) -> Any:
        raise NotImplementedError("the counting LM does not stream")

    def close(self) -> None:
        pass


def counting_lm() -> dspy.LM:
    return dspy.LM("fake/counting", engine=CountingEngine())


class Answer(dspy.Module):
    """``question -> answer`` through ``dspy.Predict`` (one LM request per call)."""

    def __init__(self) -> None:
        super().__init__()
        self.predict = dspy.Predict("question -> answer")

    def forward(self, question: str) -> dspy.Prediction:
        return self.predict(question=question)


def answer_program(name: str = "lm_usage", resource: str = "default") -> dict[str, Any]:
    """Two modules asking the counting LM: ``first`` the question, ``second`` the question again
    with a suffix (two distinct LM requests per line)."""
    def module(question: str) -> dict[str, Any]:
        return {"uses": "tests.modules.lm_usage_mods:Answer", "inputs": {"question": question}, "resource": resource}

    return {
        "name": name,
        "inputs": ["question", "again"],
        "dspy": {"lm": "tests.modules.lm_usage_mods:counting_lm"},
        "modules": {"first": module("$inputs.question"), "second": module("$inputs.again")},
        "outputs": {"first": "$first.answer", "second": "$second.answer"},
    }


#: USD the priced LM reports per call (as litellm reports ``response_cost`` in its hidden params).
PRICE_PER_CALL = 0.25


class PricedLM(dspy.BaseLM):
    """A legacy-interface LM whose responses carry usage and a price, as litellm's do."""

    def __init__(self) -> None:
        super().__init__("fake/priced")

    def forward(self, prompt: Any = None, messages: Any = None, **kwargs: Any) -> Any:
        message = SimpleNamespace(content="[[ ## answer ## ]]\npriced\n\n[[ ## completed ## ]]", role="assistant")
        return SimpleNamespace(
            choices=[SimpleNamespace(message=message, finish_reason="stop")], model="fake/priced",
            usage={"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
            _hidden_params={"response_cost": PRICE_PER_CALL},
        )


def priced_lm() -> PricedLM:
    return PricedLM()


class AnswerThenFailOnce(dspy.Module):
    """Asks the LM (the question and its attempt number), then fails its first attempt with a
    transient error: its record must sum the usage of both attempts."""

    def __init__(self) -> None:
        super().__init__()
        self.predict = dspy.Predict("question -> answer")
        url, key = os.environ.get("DSPEX_TEST_REDIS_URL"), os.environ.get(COUNTER_ENV)
        self.counter = (redis.Redis.from_url(url), f"{key}:attempts") if url and key else None

    def forward(self, question: str) -> dspy.Prediction:
        attempt = int(self.counter[0].hincrby(self.counter[1], question, 1)) if self.counter else 2
        prediction = self.predict(question=f"{question} (attempt {attempt})")
        if attempt == 1:
            raise TransientError(f"first attempt fails after its LM call: {question}")
        return prediction
