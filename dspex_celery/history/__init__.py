"""Execution history: every execution and every module attempt, in a SQL database.

Workers publish record changes (``hooks.StreamPublisher``) to a Redis stream that
``dspex-celery listener`` (``listener.Listener``) writes to the database; embedded runs write it
in-process (``hooks.EmbeddedRecorder``). ``store.HistoryStore`` owns the schema and the queries.
"""

from __future__ import annotations

from dspex_celery.history.store import HistoryStore, history_url, open_history

__all__ = ["HistoryStore", "history_url", "open_history"]
