"""Resource classes to queue names: one queue per class, plus one control queue per deployment."""

from __future__ import annotations

CONTROL = "control"


def queue_name(namespace: str, resource: str) -> str:
    """The Celery queue that serves ``resource`` (e.g. ``dspex.llm``)."""
    return f"{namespace}.{resource}" if namespace else resource


def resource_of(namespace: str, queue: str) -> str:
    """The resource class a queue of ``namespace`` serves (:func:`queue_name` read back)."""
    prefix = f"{namespace}." if namespace else ""
    return queue[len(prefix):] if prefix and queue.startswith(prefix) else queue


def control_queue(namespace: str) -> str:
    """Queue of the engine's own small tasks (level advance); every worker consumes it."""
    return queue_name(namespace, CONTROL)


def worker_queues(namespace: str, resources: list[str]) -> list[str]:
    """Queues a worker of these resource classes consumes, control queue included."""
    names = [queue_name(namespace, resource) for resource in resources]
    return list(dict.fromkeys([*names, control_queue(namespace)]))


#: Message priorities 0..9. Redis consumes the lowest number first; AMQP the highest.
PRIORITY_LEVELS = 10


def message_priority(urgency: float, broker_url: str) -> int:
    """The broker message priority for an urgency in 0..1 (1 = on the longest remaining path)."""
    level = round(max(0.0, min(1.0, urgency)) * (PRIORITY_LEVELS - 1))
    if broker_url.startswith(("redis", "rediss", "memory")):
        return PRIORITY_LEVELS - 1 - level
    return level
