"""dspex-celery: run DSPy-style programs (DAGs of modules) on a Celery cluster.

The public names below are imported on first use (PEP 562), so ``import dspex_celery.cli`` or
``dspex_celery.errors`` does not pay for Celery, Redis and SQLAlchemy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dspex_celery.batch import BatchResult, BatchRun, submit_batch
    from dspex_celery.client import ExecutionHandle, asubmit_program, submit_program
    from dspex_celery.integrations.distribute import distribute
    from dspex_celery.errors import (
        CircuitOpen,
        DspexError,
        ExecutionFailed,
        ExecutionTimeout,
        InputError,
        ModuleError,
        ModuleTimeout,
        ProgramError,
        StateLost,
        StateStoreUnreachable,
        TransientError,
        UnservedResourceWarning,
        UsageError,
    )
    from dspex_celery.program import Program
    from dspex_celery.results import ExecutionResult, ExecutionStatus, ModuleRecord, ModuleStatus
    from dspex_celery.bootstrap import create_runtime
    from dspex_celery.runtime import Runtime
    from dspex_celery.settings import Settings, load_settings

#: Each public name and the module that defines it.
_PUBLIC = {
    # programs and running them
    "Program": "dspex_celery.integrations.dspy",  # it installs Program.runner (forward() via the client)
    "submit_program": "dspex_celery.client",
    "asubmit_program": "dspex_celery.client",
    "submit_batch": "dspex_celery.batch",
    "distribute": "dspex_celery.integrations.distribute",  # needs dspy (the [dspy] extra)
    "BatchRun": "dspex_celery.batch",
    "BatchResult": "dspex_celery.batch",
    "ExecutionHandle": "dspex_celery.client",
    "ExecutionResult": "dspex_celery.results",
    "ExecutionStatus": "dspex_celery.results",
    "ModuleRecord": "dspex_celery.results",
    "ModuleStatus": "dspex_celery.results",
    # deployment
    "Settings": "dspex_celery.settings",
    "load_settings": "dspex_celery.settings",
    "Runtime": "dspex_celery.runtime",
    "create_runtime": "dspex_celery.bootstrap",
    # errors
    "DspexError": "dspex_celery.errors",
    "UsageError": "dspex_celery.errors",
    "ProgramError": "dspex_celery.errors",
    "InputError": "dspex_celery.errors",
    "ModuleError": "dspex_celery.errors",
    "TransientError": "dspex_celery.errors",
    "ModuleTimeout": "dspex_celery.errors",
    "CircuitOpen": "dspex_celery.errors",
    "ExecutionTimeout": "dspex_celery.errors",
    "ExecutionFailed": "dspex_celery.errors",
    "StateLost": "dspex_celery.errors",
    "StateStoreUnreachable": "dspex_celery.errors",
    # warnings
    "UnservedResourceWarning": "dspex_celery.errors",
}

__all__ = list(_PUBLIC)


def __getattr__(name: str) -> Any:
    """A public name, imported from its module on first use (then kept as a module attribute)."""
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public names (as ``from dspex_celery import *`` takes them)."""
    return sorted(__all__)
