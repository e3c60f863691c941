"""DSPy values of a batch line without importing dspy up front: ``dspy.Example`` / ``dspy.Prediction``
when dspy is installed, else a plain attribute mapping (pure floor; dspy loads on first use)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dspex_celery.integrations.dspy_plan import dspy_available


class Outputs(dict[str, Any]):
    """Program outputs with attribute access, when dspy (and so ``dspy.Prediction``) is absent."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"no output '{name}' (outputs: {', '.join(self) or 'none'})") from None

    def toDict(self) -> dict[str, Any]:
        return dict(self)


def make_prediction(outputs: Mapping[str, Any]) -> Any:
    """``dspy.Prediction(**outputs)`` when dspy is installed, else :class:`Outputs`."""
    if dspy_available():
        import dspy  # optional dependency (the [dspy] extra)

        return dspy.Prediction(**outputs)
    return Outputs(outputs)


def make_example(inputs: Mapping[str, Any], labels: Mapping[str, Any]) -> Any:
    """A ``dspy.Example`` (inputs marked with ``with_inputs``) or a plain attribute mapping."""
    if dspy_available():
        import dspy  # optional dependency (the [dspy] extra)

        return dspy.Example(**inputs, **labels).with_inputs(*inputs)
    return Outputs({**inputs, **labels})
