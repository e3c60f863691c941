"""Where the history database is: its URL from the settings, and the file of a SQLite one.

Apart from the store so that deciding whether history is on does not import SQLAlchemy.
"""

from __future__ import annotations

import os
from pathlib import Path

from dspex_celery.settings import Settings

#: ``DSPEX_HISTORY_URL`` values that turn history off.
DISABLED = ("off", "none", "")


def data_dir() -> Path:
    """The per-user data directory (XDG_DATA_HOME, else ~/.local/share; LOCALAPPDATA on Windows)."""
    base = os.environ.get("XDG_DATA_HOME") or os.environ.get("LOCALAPPDATA")
    return (Path(base) if base else Path.home() / ".local" / "share") / "dspex-celery"


def history_url(settings: Settings) -> str | None:
    """The history database URL in force: ``DSPEX_HISTORY_URL``, else a SQLite file; None = off."""
    url = settings.history_url
    if url is None:
        return f"sqlite:///{data_dir() / 'history.db'}"
    return None if url.strip().lower() in DISABLED else url


def sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///`` URL (None for other databases and in-memory SQLite)."""
    if not url.startswith("sqlite:///") or url in ("sqlite://", "sqlite:///:memory:"):
        return None
    return Path(url.removeprefix("sqlite:///").split("?")[0])


def history_present(settings: Settings) -> bool:
    """True when there may be history to read: it is on and, for SQLite, its file exists (a quick
    check that imports no SQLAlchemy, made before loading a profile)."""
    url = history_url(settings)
    if url is None:
        return False
    path = sqlite_path(url)
    return path is None or path.exists()
