"""A DSPy module whose compensation is one of its own methods (``compensate: undo``)."""

from __future__ import annotations

from typing import Any

import dspy


class Indexer(dspy.Module):
    """Adds a document to an 'index' (a log line ``do:NAME``); ``undo`` removes it (``undo:NAME:VALUE``)."""

    def __init__(self, prefix: str = "") -> None:
        super().__init__()
        self.prefix = prefix

    def forward(self, name: str, log: str, value: int = 0) -> dspy.Prediction:
        self._append(log, f"do:{self.prefix}{name}")
        return dspy.Prediction(value=value + 1)

    def undo(self, inputs: dict[str, Any], output: dict[str, Any]) -> None:
        self._append(inputs["log"], f"undo:{self.prefix}{inputs['name']}:{output['value']}")

    @staticmethod
    def _append(log: str, line: str) -> None:
        with open(log, "a", encoding="utf-8") as file:
            file.write(line + "\n")
