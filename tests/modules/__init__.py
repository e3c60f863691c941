"""Modules used by the tests; workers allow-list them with ``--modules tests.modules``."""
