"""Modules for the program-file tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx


def times_out_once(marker: str, **_: Any) -> dict[str, Any]:
    """Raises ``httpx.ReadTimeout`` (not transient unless ``retry.on`` names it) on its first call."""
    path = Path(marker)
    calls = int(path.read_text()) + 1 if path.exists() else 1
    path.write_text(str(calls))
    if calls == 1:
        raise httpx.ReadTimeout("read timed out (first call)")
    return {"calls": calls}
