"""Alembic migrations of the history schema, applied by ``HistoryStore`` when it opens a database.

A database already at :data:`HEAD` costs one query (:func:`at_head`). Otherwise :func:`migrate` takes
the database's write lock (SQLite ``BEGIN IMMEDIATE``, PostgreSQL ``pg_advisory_xact_lock``), so
processes opening it together wait for the first one, looks again and then: upgrades an empty
database to head; stamps a database made before Alembic (``dspex_schema`` row, no version table) as
``0001`` and upgrades it; upgrades an older revision; refuses a revision this release does not know.

A schema change is a new script in ``versions/`` (``down_revision`` = the old head) and a new
:data:`HEAD`; Alembic is configured in code (:func:`alembic_config`), no ``alembic.ini``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Connection, Engine, create_engine, event, insert, inspect, select, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from dspex_celery.errors import ConfigError
from dspex_celery.history.models import SCHEMA, SCHEMA_VERSION

if TYPE_CHECKING:  # Alembic is imported only when a database needs migrating (~200 ms)
    from alembic.config import Config

log = logging.getLogger(__name__)

#: Alembic's version table (its own name: the database may be shared with other applications).
VERSION_TABLE = "dspex_alembic_version"
#: The newest revision in ``versions/`` (a test checks it against the scripts).
HEAD = "0002"
#: The revision of the schema that releases before Alembic created.
INITIAL = "0001"
SCRIPTS = Path(__file__).parent
#: ``pg_advisory_xact_lock`` key serialising migrations of one PostgreSQL database.
PG_LOCK_KEY = 0x64737078_68697374  # "dspxhist"

_AT_HEAD = text(
    f"SELECT v.version_num, s.version FROM {VERSION_TABLE} v, {SCHEMA.name} s WHERE s.name = 'history'"
)


def at_head(engine: Engine) -> bool:
    """Whether the database is at :data:`HEAD` with this release's version row (one query)."""
    try:
        with engine.connect() as connection:
            row = connection.execute(_AT_HEAD).first()
    except SQLAlchemyError:  # no tables yet, or a database to look at closer
        return False
    return row is not None and tuple(row) == (HEAD, SCHEMA_VERSION)


def migrate(engine: Engine, where: str, *, create: bool) -> None:
    """Bring the database to :data:`HEAD` under its write lock; ``create=False`` refuses an empty one."""
    with locked(engine) as connection:
        current = current_revision(connection)
        if current is None:
            current = adopt(connection, where, create=create)
        if current != HEAD:
            upgrade(connection, where, current)
        check_version_row(connection, where)


def current_revision(connection: Connection) -> str | None:
    """The revision in the version table, ``None`` without one."""
    if not inspect(connection).has_table(VERSION_TABLE):
        return None
    return connection.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()


def adopt(connection: Connection, where: str, *, create: bool) -> str | None:
    """A database without a version table: stamp one made before Alembic, else it is empty."""
    if inspect(connection).has_table(SCHEMA.name):
        check_version_row(connection, where)
        run(connection, "stamp", INITIAL)
        log.info("history database %s: schema made before Alembic, stamped revision %s", where, INITIAL)
        return INITIAL
    if not create:
        raise ConfigError(f"no history database at {where}: run a program or start the listener first")
    return None


def upgrade(connection: Connection, where: str, current: str | None) -> None:
    """Upgrade to head; a revision newer than this release is refused."""
    if current is not None and current not in known_revisions():
        raise ConfigError(
            f"history database {where} is at schema revision {current}, newer than this dspex-celery knows "
            f"(head {HEAD}): upgrade dspex-celery"
        )
    run(connection, "upgrade", "head")
    log.info("history database %s: schema upgraded from %s to %s", where, current or "empty", HEAD)


def check_version_row(connection: Connection, where: str) -> None:
    """Refuse a ``dspex_schema`` row of another version; add it when it is missing."""
    version = connection.scalar(select(SCHEMA.c.version).where(SCHEMA.c.name == "history"))
    if version is None:
        connection.execute(insert(SCHEMA).values(name="history", version=SCHEMA_VERSION))
    elif version != SCHEMA_VERSION:
        raise ConfigError(
            f"history database {where} has schema version {version}, this dspex-celery "
            f"uses {SCHEMA_VERSION}: point DSPEX_HISTORY_URL at a new database"
        )


@contextmanager
def locked(engine: Engine) -> Iterator[Connection]:
    """A transaction holding the database's migration lock (committed when the block succeeds)."""
    if engine.dialect.name == "sqlite" and engine.url.database not in (None, "", ":memory:"):
        yield from _sqlite_locked(engine)
        return
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_LOCK_KEY})
        yield connection


def _sqlite_locked(engine: Engine) -> Iterator[Connection]:
    """SQLite's write lock from the first statement: ``BEGIN IMMEDIATE`` on a connection of its own."""
    immediate = create_engine(engine.url, poolclass=NullPool, connect_args={"timeout": 30, "isolation_level": None})
    event.listen(immediate, "begin", lambda connection: connection.exec_driver_sql("BEGIN IMMEDIATE"))
    try:
        with immediate.begin() as connection:
            yield connection
    finally:
        immediate.dispose()


def run(connection: Connection, command: str, revision: str) -> None:
    """Alembic's ``stamp``/``upgrade`` on ``connection`` (in its transaction)."""
    quiet_alembic()
    from alembic import command as commands  # lazy: only a database that needs migrating pays for Alembic

    getattr(commands, command)(alembic_config(connection), revision)


def quiet_alembic() -> None:
    """Alembic's INFO lines (plugins, context) are noise in a worker's log: ours say what was done.
    A level the application set for the ``alembic`` logger is kept."""
    alembic_log = logging.getLogger("alembic")
    if alembic_log.level == logging.NOTSET:
        alembic_log.setLevel(logging.WARNING)


def known_revisions() -> set[str]:
    """Every revision id in ``versions/``."""
    quiet_alembic()
    from alembic.script import ScriptDirectory  # lazy, as in run()

    return {script.revision for script in ScriptDirectory.from_config(alembic_config()).walk_revisions()}


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's configuration, built in code: the scripts in this package, ``connection`` for env.py."""
    from alembic.config import Config  # lazy, as in run()

    config = Config()
    config.set_main_option("script_location", str(SCRIPTS).replace("%", "%%"))
    config.attributes["connection"] = connection
    return config
