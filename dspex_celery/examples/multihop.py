# mypy: disable-error-code="no-untyped-def,var-annotated"
# (the tutorial's class is kept exactly as DSPy wrote it, without annotations)
"""DSPy's multi-hop search tutorial program, distributed unchanged (``dspex_celery.distribute``).

``Hop`` is the tutorial's class as it is (https://dspy.ai/tutorials/multihop_search/): each hop's
``generate_query`` and ``append_notes`` calls run on the cluster, ``search`` (plain Python) runs in
the client between them, and the loop is the tutorial's loop. ``offline_lm`` is a ``DummyLM`` so it
runs without an API key; ``search`` looks in the bundled corpus instead of a BM25 index of Wikipedia.

    dspex-celery run dspex_celery.examples.multihop:Hop -i claim="Celery chords need a result backend" \\
        --lm dspex_celery.examples.multihop:offline_lm --with num_docs=2 --with num_hops=2

or ``python -m dspex_celery.examples.multihop`` (in-process unless DSPEX_BROKER_URL names a cluster).
"""

from __future__ import annotations

import sys

import dspy
from dspy.utils import DummyLM

from dspex_celery.examples.rag import retrieve as keyword_retrieve


def search(query: str, k: int) -> list[str]:
    """The ``k`` corpus passages sharing the most terms with ``query``, as ``id | text``."""
    found = keyword_retrieve(query, k)
    return [f"{doc_id} | {text}" for doc_id, text in zip(found["ids"], found["passages"], strict=True)]


# --- the tutorial's program, unchanged -------------------------------------------------------------


class Hop(dspy.Module):
    def __init__(self, num_docs=10, num_hops=4):
        self.num_docs, self.num_hops = num_docs, num_hops
        self.generate_query = dspy.ChainOfThought('claim, notes -> query')
        self.append_notes = dspy.ChainOfThought('claim, notes, context -> new_notes: list[str], titles: list[str]')

    def forward(self, claim: str) -> list[str]:
        notes = []
        titles = []

        for _ in range(self.num_hops):
            query = self.generate_query(claim=claim, notes=notes).query
            context = search(query, k=self.num_docs)
            prediction = self.append_notes(claim=claim, notes=notes, context=context)
            notes.extend(prediction.new_notes)
            titles.extend(prediction.titles)

        return dspy.Prediction(notes=notes, titles=list(set(titles)))


# --- running it offline ----------------------------------------------------------------------------


def offline_lm() -> DummyLM:
    """A deterministic stand-in LM: notes for ``append_notes`` prompts (they have a context), a query else."""
    return DummyLM({
        "[[ ## context ## ]]": {"reasoning": "The passages are about Celery.",
                                "new_notes": '["Celery chords run a callback after a group finishes."]',
                                "titles": '["chord"]'},
        "[[ ## claim ## ]]": {"reasoning": "Look up what the claim is about.", "query": "Celery chord callback"},
    })


def main(claim: str = "Celery chords need a result backend") -> None:
    from dspex_celery import distribute
    from dspex_celery.examples import multihop  # Hop by its importable name (run with -m, this is __main__)

    options = {"num_docs": 2, "num_hops": 2}
    hop = distribute(multihop.Hop(**options), lm="dspex_celery.examples.multihop:offline_lm", with_=options,
                     resources={"*": "llm"})
    print(hop(claim=claim))


if __name__ == "__main__":
    main(*sys.argv[1:2])
