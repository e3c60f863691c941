"""A module whose import leaves a mark (a file in ``$IMPORT_CANARY_DIR``): no worker may import it
because a plan names it."""

from __future__ import annotations

import os
from pathlib import Path

if os.environ.get("IMPORT_CANARY_DIR"):
    Path(os.environ["IMPORT_CANARY_DIR"], f"imported-by-{os.getpid()}").touch()


class Boom(Exception):
    """An error class a plan's ``retry.on`` may name."""
