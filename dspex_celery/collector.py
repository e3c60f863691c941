"""Building large trees of objects with the cyclic garbage collector paused."""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable
from typing import ParamSpec, TypeVar

_P = ParamSpec("_P")
_R = TypeVar("_R")


def without_collection(function: Callable[_P, _R]) -> Callable[_P, _R]:
    """``function``, run with the cyclic garbage collector paused (reference counting frees as usual).

    Parsing and planning a program allocate tens of thousands of containers that stay alive until the
    result is done and form no cycles: each collection their allocations trigger meanwhile traverses
    them for nothing and moves them on towards the full collections that traverse the whole heap
    (a 1000-module plan: ~20 collections, and a full one every few plans). Paused, they are collected
    once, after it. A collector that was off stays off. (Mercurial's ``util.nogc`` does the same.)
    """
    @functools.wraps(function)
    def paused(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        if not gc.isenabled():
            return function(*args, **kwargs)
        gc.disable()
        try:
            return function(*args, **kwargs)
        finally:
            gc.enable()

    return paused
