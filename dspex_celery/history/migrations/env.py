"""Alembic's environment for the history schema: migrations run on the connection the store passes."""

from __future__ import annotations

from alembic import context

from dspex_celery.history.migrations import VERSION_TABLE
from dspex_celery.history.models import metadata


def run_migrations() -> None:
    """Run on ``config.attributes["connection"]`` (inside the caller's transaction and lock)."""
    connection = context.config.attributes["connection"]
    context.configure(connection=connection, target_metadata=metadata, version_table=VERSION_TABLE)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("the history migrations run online only: open the database with dspex-celery")
run_migrations()
