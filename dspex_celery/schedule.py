"""The learned schedule: how many slots each resource class has (learned from history), and dispatch
priorities from a greedy list schedule simulated with learned durations and those slot counts.

The simulation is the informed greedy schedule: whenever a slot of a module's resource class is free,
the ready module with the longest remaining path (by learned duration) starts. Its start order becomes
the plan's priorities (how long before the schedule's end a module starts: the earliest the most
urgent), so the engine dispatches modules in the order that schedule starts them, also where it runs
slower or faster than simulated. (By start time rather than by rank: modules the schedule starts
together share a broker priority level, measured a little closer to the informed schedule with the
broker's ten levels.)
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import replace
from datetime import datetime

from dspex_celery.plan import Plan

#: An attempt as the slot count is learned from: (execution id, resource class, started, finished).
Span = tuple[str, str, datetime, datetime]


def learned_slots(spans: Iterable[Span]) -> dict[str, int]:
    """Per resource class, the most attempts that ran at the same time in one execution: the slots it
    had (at least; an execution that never filled them shows fewer)."""
    events: dict[tuple[str, str], list[tuple[datetime, int]]] = defaultdict(list)
    for execution_id, resource, started, finished in spans:
        events[execution_id, resource] += [(started, 1), (finished, -1)]
    slots: dict[str, int] = {}
    for (_, resource), changes in events.items():
        running = peak = 0
        for _, change in sorted(changes):  # at one instant an end (-1) comes before a start
            running += change
            peak = max(peak, running)
        slots[resource] = max(slots.get(resource, 0), peak)
    return dict(sorted(slots.items()))


def start_order(plan: Plan, weights: Mapping[str, float], slots: Mapping[str, int]) -> list[str]:
    """The modules in the order the greedy list schedule starts them."""
    return list(start_times(plan, weights, slots))


def start_times(plan: Plan, weights: Mapping[str, float], slots: Mapping[str, int]) -> dict[str, float]:
    """When the greedy list schedule starts each module (seconds, in start order; modules without a
    weight take no time; a resource class without a learned slot count has a slot for every ready
    module)."""
    left = {name: len(module.parents) for name, module in plan.modules.items()}
    ready: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for name, count in left.items():
        if count == 0:
            ready[plan.modules[name].resource].append((-plan.modules[name].priority, name))
    for queue in ready.values():
        heapq.heapify(queue)
    free = {resource: slots.get(resource, len(plan.modules)) for resource in {m.resource for m in plan.modules.values()}}
    running: list[tuple[float, str]] = []
    order: dict[str, float] = {}
    now = 0.0
    while len(order) < len(plan.modules):
        for resource, queue in ready.items():
            while queue and free[resource] > 0:
                name = heapq.heappop(queue)[1]
                free[resource] -= 1
                order[name] = now
                heapq.heappush(running, (now + weights.get(name, 0.0), name))
        if not running:
            break
        now, done = heapq.heappop(running)
        free[plan.modules[done].resource] += 1
        for child in plan.modules[done].children:
            left[child] -= 1
            if left[child] == 0:
                heapq.heappush(ready[plan.modules[child].resource], (-plan.modules[child].priority, child))
    return order


def scheduled(plan: Plan, weights: Mapping[str, float], slots: Mapping[str, int]) -> Plan:
    """``plan`` (planned with ``weights``) with priorities from :func:`start_times`: the schedule's
    length minus the module's start (the first started has the highest); its critical path stays the
    one by duration. Unchanged when the schedule takes no time (no weights)."""
    starts = start_times(plan, weights, slots)
    end = max((start + weights.get(name, 0.0) for name, start in starts.items()), default=0.0)
    if len(starts) != len(plan.modules) or end <= 0:
        return plan
    modules = {name: replace(module, priority=end - starts[name]) for name, module in plan.modules.items()}
    return replace(plan, modules=modules, max_priority=end)
