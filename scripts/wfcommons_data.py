"""WfCommons benchmark workflows: generate them once (``wfcommons`` recipes), load the committed JSON.

    .venv/bin/python scripts/wfcommons_data.py   # regenerates scripts/data/wfcommons/*.json

Each file is a compact DAG: ``{"name", "recipe", "seed", "slots", "tasks": [{"name", "ms", "parents"}]}``,
task runtimes scaled so that total work / ``slots`` ≈ ``TARGET_S`` (the recipes' own runtimes
keep their shape: the ratios between tasks and the structure are WfCommons'). The benchmark reads
only the JSON (``wfcommons`` is needed to regenerate, not to run).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parent / "data" / "wfcommons"
RECIPES = ("montage", "epigenomics", "blast", "cycles", "genome", "seismology", "soykb", "srasearch")
TASKS = 200
SLOTS = 8
TARGET_S = 1.2  # work / slots
SEED = 1


@dataclass(frozen=True)
class Workflow:
    """One workflow: task durations (ms) and parents, in a topological order."""

    name: str
    ms: dict[str, float]
    parents: dict[str, list[str]]

    @classmethod
    def load(cls, path: Path) -> Workflow:
        data = json.loads(path.read_text())
        return cls(data["name"], {t["name"]: float(t["ms"]) for t in data["tasks"]},
                   {t["name"]: list(t["parents"]) for t in data["tasks"]})

    @cached_property
    def children(self) -> dict[str, list[str]]:
        children: dict[str, list[str]] = {name: [] for name in self.ms}
        for name, parents in self.parents.items():
            for parent in parents:
                children[parent].append(name)
        return children

    @cached_property
    def order(self) -> list[str]:
        """Topological order (Kahn, stable)."""
        left = {name: len(parents) for name, parents in self.parents.items()}
        queue = [name for name, count in left.items() if count == 0]
        for name in queue:
            for child in self.children[name]:
                left[child] -= 1
                if left[child] == 0:
                    queue.append(child)
        return queue

    def remaining_s(self) -> dict[str, float]:
        """Longest path from each task to a sink, by duration, seconds (the task included)."""
        remaining: dict[str, float] = {}
        for name in reversed(self.order):
            remaining[name] = self.ms[name] / 1000 + max((remaining[c] for c in self.children[name]), default=0.0)
        return remaining

    @property
    def critical_path_s(self) -> float:
        return max(self.remaining_s().values())

    @property
    def work_s(self) -> float:
        return sum(self.ms.values()) / 1000

    def lower_bound_s(self, slots: int = SLOTS) -> float:
        return max(self.critical_path_s, self.work_s / slots)

    def critical_chain(self) -> list[str]:
        remaining = self.remaining_s()
        chain = [max((n for n in self.ms if not self.parents[n]), key=lambda n: remaining[n])]
        while self.children[chain[-1]]:
            chain.append(max(self.children[chain[-1]], key=lambda n: remaining[n]))
        return chain


def load_all(names: tuple[str, ...] = RECIPES) -> list[Workflow]:
    return [Workflow.load(DATA / f"{name}.json") for name in names if (DATA / f"{name}.json").exists()]


def generate(recipe: str, tasks: int = TASKS, seed: int = SEED) -> dict[str, Any]:
    """One recipe's workflow as the compact JSON DAG (runtimes scaled)."""
    # bench-only dependency (the `bench` extra): needed to regenerate the data, not to run the benchmark
    import wfcommons.wfchef.recipes as recipes
    from wfcommons import WorkflowGenerator

    random.seed(seed)
    cls = getattr(recipes, f"{recipe.capitalize()}Recipe")
    workflow = WorkflowGenerator(cls.from_num_tasks(tasks)).build_workflow()
    names = {node: re.sub(r"\W", "_", node) for node in workflow.nodes}
    runtimes = {node: max(float(workflow.nodes[node]["task"].runtime or 0.0), 0.0) for node in workflow.nodes}
    scale = TARGET_S * SLOTS * 1000 / (sum(runtimes.values()) or 1.0)
    rows = [{"name": names[node], "ms": round(runtimes[node] * scale, 1),
             "parents": sorted(names[parent] for parent in workflow.predecessors(node))}
            for node in workflow.nodes]
    return {"name": recipe, "recipe": f"wfcommons {recipe} (WfChef), {tasks} tasks requested", "seed": seed,
            "slots": SLOTS, "tasks": rows}


def main() -> None:
    DATA.mkdir(parents=True, exist_ok=True)
    for recipe in RECIPES:
        data = generate(recipe)
        (DATA / f"{recipe}.json").write_text(json.dumps(data, separators=(",", ":")) + "\n")
        workflow = Workflow.load(DATA / f"{recipe}.json")
        print(f"{recipe}: {len(workflow.ms)} tasks, work/slots {workflow.work_s / SLOTS:.2f} s, "
              f"critical path {workflow.critical_path_s:.2f} s")


if __name__ == "__main__":
    main()
