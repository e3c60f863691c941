"""A latency LM for benchmarks (scripts/bench_lm_batch.py): the RAG example's offline DummyLM, 100 ms per call.

Used as ``dspy.lm: dspex_celery.examples.latency_lm:latency_lm`` on the workers and in-process by
``dspy.Evaluate``; caching is off so every call waits (a repeated round must not hit DSPy's cache).
"""

from __future__ import annotations

import os
import time
from typing import Any

from dspy.utils import DummyLM

from dspex_celery.examples.dspy_rag import offline_lm

#: Seconds each LM call takes (DSPEX_BENCH_LM_LATENCY_S overrides it on workers and client alike).
LATENCY_S = float(os.environ.get("DSPEX_BENCH_LM_LATENCY_S", "0.1"))


class LatencyLM(DummyLM):
    """``DummyLM`` that sleeps ``LATENCY_S`` before each answer (an I/O-bound remote LM)."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        time.sleep(LATENCY_S)
        return super().forward(*args, **kwargs)


def latency_lm() -> LatencyLM:
    """The example's offline answers behind a 100 ms call, uncached."""
    lm = LatencyLM(offline_lm().answers)
    lm.cache = False
    return lm
