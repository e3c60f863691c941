"""Synthetic programs for tests and benchmarks: layered, fan-out, chains and seeded random DAGs.

Every module is :func:`work`: it sleeps ``ms`` milliseconds and returns the sum of its numeric
inputs plus one, so outputs are deterministic and check that every edge carried its value.
"""

from __future__ import annotations

import random
import time
from typing import Any

WORK = "dspex_celery.examples.synthetic:work"


def work(ms: float = 0.0, **inputs: Any) -> dict[str, Any]:
    """Sleep ``ms`` milliseconds; ``value`` is 1 + the sum of numeric inputs."""
    if ms > 0:
        time.sleep(ms / 1000.0)
    return {"value": 1 + sum(v for v in inputs.values() if isinstance(v, int | float) and not isinstance(v, bool))}


def _module(parents: list[str], ms: float = 0.0, resource: str | None = None) -> dict[str, Any]:
    inputs: dict[str, Any] = {f"p_{parent}": f"${parent}.value" for parent in parents}
    if ms:
        inputs["ms"] = ms
    module: dict[str, Any] = {"uses": WORK, "inputs": inputs}
    if resource:
        module["resource"] = resource
    return module


def layered(depth: int, width: int, name: str = "layered", ms: float = 0.0) -> dict[str, Any]:
    """``depth`` levels of ``width`` modules; each module reads two modules of the level above."""
    modules: dict[str, Any] = {}
    for level in range(depth):
        for index in range(width):
            parents = [] if level == 0 else sorted({f"m{level - 1}_{index}", f"m{level - 1}_{(index + 1) % width}"})
            modules[f"m{level}_{index}"] = _module(parents, ms)
    return {"name": name, "modules": modules}


def fan_out(width: int, name: str = "fanout", ms: float = 0.0) -> dict[str, Any]:
    """One source, ``width`` parallel modules, one sink that sums them all."""
    modules: dict[str, Any] = {"source": _module([])}
    for index in range(width):
        modules[f"w{index}"] = _module(["source"], ms)
    modules["sink"] = _module([f"w{index}" for index in range(width)])
    return {"name": name, "modules": modules, "outputs": {"total": "$sink.value"}}


def chain(length: int, name: str = "chain", ms: float = 0.0) -> dict[str, Any]:
    """A straight line of ``length`` modules."""
    modules = {f"c{index}": _module([f"c{index - 1}"] if index else [], ms) for index in range(length)}
    return {"name": name, "modules": modules, "outputs": {"value": f"$c{length - 1}.value"}}


def random_dag(
    size: int,
    seed: int,
    name: str = "random",
    max_parents: int = 3,
    durations_ms: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """A seeded random DAG; durations (if given) are heavy-tailed (Pareto) within the bounds."""
    rng = random.Random(seed)
    modules: dict[str, Any] = {}
    for index in range(size):
        candidates = [f"n{j}" for j in range(max(0, index - 20), index)]
        parents = sorted(rng.sample(candidates, k=min(len(candidates), rng.randint(0, max_parents))))
        ms = _heavy_tailed(rng, *durations_ms) if durations_ms else 0.0
        modules[f"n{index}"] = _module(parents, round(ms, 1))
    return {"name": name, "modules": modules}


def dense_dag(size: int, seed: int, name: str = "dense", parents: int = 5, window: int = 50) -> dict[str, Any]:
    """A seeded DAG with ``parents`` parents per module (fewer only for the first ones), drawn
    from the ``window`` modules before it: ~``parents`` x ``size`` edges (planner benchmarks)."""
    rng = random.Random(seed)
    modules: dict[str, Any] = {}
    for index in range(size):
        candidates = [f"d{j}" for j in range(max(0, index - window), index)]
        modules[f"d{index}"] = _module(sorted(rng.sample(candidates, k=min(parents, len(candidates)))))
    return {"name": name, "modules": modules}


def _heavy_tailed(rng: random.Random, low: float, high: float) -> float:
    return min(high, low * rng.paretovariate(1.2))


def expected_values(program: dict[str, Any]) -> dict[str, int]:
    """What :func:`work` returns for every module of a synthetic program (computed locally)."""
    values: dict[str, int] = {}
    pending = dict(program["modules"])
    while pending:
        for name, module in list(pending.items()):
            parents = [ref[1:].split(".")[0] for key, ref in module["inputs"].items() if key.startswith("p_")]
            if all(parent in values for parent in parents):
                values[name] = 1 + sum(values[parent] for parent in parents)
                del pending[name]
    return values
