"""Execution history: every execution and every module attempt, in a SQL database.

Workers publish record changes (``hooks.StreamPublisher``) to a Redis stream that
``dspex-celery listener`` (``listener.Listener``) writes to the database; embedded runs write it
in-process (``hooks.EmbeddedRecorder``). ``store.HistoryStore`` owns the schema and the queries.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dspex_celery.history.store import HistoryStore, history_url, open_history

__all__ = ["HistoryStore", "history_url", "open_history"]


def __getattr__(name: str) -> Any:
    """The store's public names, imported on first use: a worker that only publishes history never
    imports SQLAlchemy."""
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module("dspex_celery.history.store"), name)
