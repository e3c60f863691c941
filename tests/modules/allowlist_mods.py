"""Modules for the allow-list tests: what this package defines runs; what it only imports must not."""

from __future__ import annotations

import functools
import os
from os import environ, system
from typing import Any

#: Imported objects re-exported under this module's names (none of them is defined here).
shell = functools.partial(system)
copy_environment = environ.copy
IMPORTED = (system, environ)


class Shell:
    """A class defined here whose attributes are not: a builtin, a static builtin, the environment."""

    run = system
    run_static = staticmethod(os.system)
    env = environ


class Greeter:
    """Methods of a class defined here, and of an instance of it, are modules like functions."""

    def __init__(self, greeting: str = "hello") -> None:
        self.greeting = greeting

    def greet(self, name: str) -> dict[str, Any]:
        return {"text": f"{self.greeting} {name}"}

    @staticmethod
    def shout(name: str) -> dict[str, Any]:
        return {"text": name.upper()}

    @classmethod
    def kind(cls, name: str) -> dict[str, Any]:
        return {"text": f"{cls.__name__}:{name}"}


greeter = Greeter("hi")


def not_a_number(nested: bool = False) -> dict[str, Any]:
    """NaN at the top of an output, or Infinity deep inside one: JSON has neither."""
    return {"scores": [1.0, {"inf": float("inf")}]} if nested else {"value": float("nan")}


def upstream_sum(value: float) -> dict[str, Any]:
    return {"value": value + 1}
