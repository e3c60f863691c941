"""Small deterministic modules for engine tests."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel


def add(a: float, b: float) -> dict[str, Any]:
    return {"sum": a + b}


def mul(a: float, b: float) -> dict[str, Any]:
    return {"product": a * b}


def echo(**kwargs: Any) -> dict[str, Any]:
    """Returns its keyword arguments unchanged."""
    return dict(kwargs)


def total(**kwargs: Any) -> dict[str, Any]:
    """Sums every numeric argument (fan-in)."""
    return {"total": sum(value for value in kwargs.values() if isinstance(value, int | float))}


def inc(x: int = 0, **_: Any) -> dict[str, Any]:
    return {"x": x + 1}


def whereami(**kwargs: Any) -> dict[str, Any]:
    """Where it ran: process id and host, plus its inputs."""
    return {"pid": os.getpid(), "host": socket.gethostname(), **kwargs}


def sleep(seconds: float = 0.1, value: Any = None, **_: Any) -> dict[str, Any]:
    time.sleep(seconds)
    return {"value": value, "slept": seconds}


def sleep_marked(seconds: float, marker: str, **_: Any) -> dict[str, Any]:
    """Create the file ``marker`` (the module has started), then sleep."""
    Path(marker).touch()
    time.sleep(seconds)
    return {"slept": seconds}


def fail(message: str = "boom", **_: Any) -> dict[str, Any]:
    raise ValueError(message)


def not_json(**_: Any) -> dict[str, Any]:
    return {"blob": b"bytes are not JSON"}


def not_mapping(**_: Any) -> list[int]:
    return [1, 2, 3]


class Answer(BaseModel):
    text: str
    score: float


def as_model(question: str) -> Answer:
    return Answer(text=question.upper(), score=1.0)


class Scaler:
    """A class module: instantiated once per worker process with ``with:``."""

    def __init__(self, factor: float = 1.0) -> None:
        self.factor = factor
        self.calls = 0

    def __call__(self, x: float) -> dict[str, Any]:
        self.calls += 1
        return {"y": x * self.factor, "pid": os.getpid()}


#: A diamond of these modules on three resource classes (io, default, llm): result = 2(x+1) + (x+1) + 10.
DIAMOND = {
    "name": "diamond",
    "inputs": ["x"],
    "modules": {
        "top": {"uses": "tests.modules.basic:add", "inputs": {"a": "$inputs.x", "b": 1}, "resource": "io"},
        "left": {"uses": "tests.modules.basic:mul", "inputs": {"a": "$top.sum", "b": 2}, "resource": "llm"},
        "right": {"uses": "tests.modules.basic:add", "inputs": {"a": "$top.sum", "b": 10}},
        "bottom": {"uses": "tests.modules.basic:add", "inputs": {"a": "$left.product", "b": "$right.sum"}, "resource": "llm"},
    },
    "outputs": {"result": "$bottom.sum", "top": "$top"},
}
