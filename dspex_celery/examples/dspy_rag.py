"""A DSPy RAG program, runnable offline: retrieve passages, then answer with a DSPy Signature.

``examples/dspy_rag.yaml`` runs these modules; ``offline_lm`` is a ``DummyLM`` (dict mode) so the
example needs no API key. For a real model, point ``dspy.lm`` at ``openai_lm`` (or your own factory).
"""

from __future__ import annotations

import dspy
from dspy.utils import DummyLM

from dspex_celery.examples.rag import retrieve as keyword_retrieve

#: What the offline LM answers, keyed on text of the question it is asked (DummyLM's dict mode).
OFFLINE_ANSWERS: dict[str, str] = {
    "Celery chord": "A chord runs a group of tasks in parallel, then a callback once all have finished.",
    "Redis": "Redis is an in-memory data store, often Celery's broker and result backend.",
    "DSPy": "DSPy composes modules with signatures into programs and compiles them with optimizers.",
    "Flower": "Flower monitors Celery workers and tasks in real time.",
}
FALLBACK_ANSWER = "The context does not say."


class Retrieve(dspy.Module):
    """The ``k`` passages of the bundled corpus that share the most terms with the question."""

    def __init__(self, k: int = 2) -> None:
        super().__init__()
        self.k = k

    def forward(self, question: str) -> dspy.Prediction:
        found = keyword_retrieve(question, self.k)
        return dspy.Prediction(passages=found["passages"], ids=found["ids"])


class GenerateAnswer(dspy.Signature):
    """Answer the question in one sentence, using only the context."""

    context: list[str] = dspy.InputField(desc="passages that may contain the answer")
    question: str = dspy.InputField()
    answer: str = dspy.OutputField(desc="one sentence")


class Generate(dspy.Module):
    """Chain-of-thought answer generation; its demos come from ``state:`` (a compiled program)."""

    def __init__(self) -> None:
        super().__init__()
        self.respond = dspy.ChainOfThought(GenerateAnswer)

    def forward(self, question: str, context: list[str]) -> dspy.Prediction:
        return self.respond(question=question, context=context)


def offline_lm() -> DummyLM:
    """A deterministic stand-in LM: the first ``OFFLINE_ANSWERS`` key found in the prompt wins."""
    answers = {
        key: {"reasoning": f"The context explains {key}.", "answer": answer} for key, answer in OFFLINE_ANSWERS.items()
    }
    answers["[[ ## question ## ]]"] = {"reasoning": "Nothing in the context matches.", "answer": FALLBACK_ANSWER}
    return DummyLM(answers)


def compile_generate(path: str) -> None:
    """Write ``examples/dspy_rag.state.json``: ``Generate`` compiled by an optimizer, saved as JSON.

    ``python -c "from dspex_celery.examples.dspy_rag import compile_generate as c; c('examples/dspy_rag.state.json')"``
    """
    trainset = [
        dspy.Example(
            question="What does Flower do?",
            context=[keyword_retrieve("What does Flower do?")["passages"][0]],
            reasoning="The context says Flower is a web tool for monitoring Celery.",
            answer=OFFLINE_ANSWERS["Flower"],
        ).with_inputs("question", "context"),
    ]
    compiled = dspy.LabeledFewShot(k=1).compile(Generate(), trainset=trainset)
    compiled.save(path)


def openai_lm() -> dspy.LM:
    """A real LM (needs ``OPENAI_API_KEY`` on the workers): ``dspy: {lm: ...:openai_lm}``."""
    return dspy.LM("openai/gpt-4o-mini", num_retries=0)  # dspex-celery retries rate limits itself
