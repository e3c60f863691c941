"""Resource classes to queue names: one queue per class, plus one control queue per deployment."""

from __future__ import annotations

CONTROL = "control"


def queue_name(namespace: str, resource: str) -> str:
    """The Celery queue that serves ``resource`` (e.g. ``dspex.llm``)."""
    return f"{namespace}.{resource}" if namespace else resource


def control_queue(namespace: str) -> str:
    """Queue of the engine's own small tasks (level advance); every worker consumes it."""
    return queue_name(namespace, CONTROL)


def worker_queues(namespace: str, resources: list[str]) -> list[str]:
    """Queues a worker of these resource classes consumes, control queue included."""
    names = [queue_name(namespace, resource) for resource in resources]
    return list(dict.fromkeys([*names, control_queue(namespace)]))
