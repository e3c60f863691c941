"""A metric for the batch progress test: the score is the line's own ``expected`` label."""

from __future__ import annotations

from typing import Any


def expected(example: Any, prediction: Any, trace: Any = None) -> float:
    return float(example.expected)
