"""Modules used by the tests; workers allow-list them with ``--modules tests.modules``."""

import os

#: The suite's Redis when ``DSPEX_TEST_REDIS_URL`` is not set (conftest passes it to every worker).
DEFAULT_TEST_REDIS_URL = "redis://127.0.0.1:6379/3"


def suite_redis_url() -> str:
    """The Redis the test suite uses: ``DSPEX_TEST_REDIS_URL``, else the local default (db 3)."""
    return os.environ.get("DSPEX_TEST_REDIS_URL", DEFAULT_TEST_REDIS_URL)
