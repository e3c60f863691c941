"""A tiny offline RAG program: a keyword retriever over a bundled corpus and a template generator."""

from __future__ import annotations

import json
import re
from functools import cache
from importlib import resources
from typing import Any

WORD = re.compile(r"[a-z0-9]+")
STOPWORDS = frozenset("a an and are as by for from in is it of on or the to what which who with does do how".split())


@cache
def corpus() -> tuple[dict[str, str], ...]:
    """The bundled passages."""
    text = resources.files("dspex_celery.examples").joinpath("corpus.json").read_text(encoding="utf-8")
    return tuple(json.loads(text))


def _terms(text: str) -> set[str]:
    return {word for word in WORD.findall(text.lower()) if word not in STOPWORDS}


def retrieve(question: str, k: int = 2) -> dict[str, Any]:
    """The ``k`` passages sharing the most terms with the question."""
    query = _terms(question)
    ranked = sorted(corpus(), key=lambda doc: (-len(query & _terms(doc["text"])), doc["id"]))
    top = [doc for doc in ranked[:k] if query & _terms(doc["text"])]
    return {"passages": [doc["text"] for doc in top], "ids": [doc["id"] for doc in top]}


def generate(question: str, context: list[str]) -> dict[str, Any]:
    """An answer assembled from the first passage (a stand-in for an LLM call)."""
    if not context:
        return {"answer": f"I found nothing about: {question}", "sources": 0}
    return {"answer": context[0], "sources": len(context)}


class Generator:
    """The class form of a module: instantiated once per worker process with ``with:`` kwargs."""

    def __init__(self, prefix: str = "Answer:") -> None:
        self.prefix = prefix

    def __call__(self, question: str, context: list[str]) -> dict[str, Any]:
        answer = generate(question, context)["answer"]
        return {"answer": f"{self.prefix} {answer}"}
