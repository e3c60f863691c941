"""dspex-celery: run DSPy-style programs (DAGs of modules) on a Celery cluster."""

from dspex_celery.batch import BatchResult, BatchRun, submit_batch
from dspex_celery.client import ExecutionHandle, submit_program
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

__all__ = [
    # programs and running them
    "Program",
    "submit_program",
    "submit_batch",
    "BatchRun",
    "BatchResult",
    "ExecutionHandle",
    "ExecutionResult",
    "ExecutionStatus",
    "ModuleRecord",
    "ModuleStatus",
    # deployment
    "Settings",
    "load_settings",
    "Runtime",
    "create_runtime",
    # errors
    "DspexError",
    "UsageError",
    "ProgramError",
    "InputError",
    "ModuleError",
    "TransientError",
    "ModuleTimeout",
    "CircuitOpen",
    "ExecutionTimeout",
    "ExecutionFailed",
    "StateLost",
    "StateStoreUnreachable",
    # warnings
    "UnservedResourceWarning",
]
