"""DSPy programs on dspex-celery: the client side (API floor).

- ``Program.forward`` / ``Program(...)`` run the program through the client and return a
  ``dspy.Prediction``: this module installs :func:`run_program` as ``Program.runner`` (importing
  ``Program`` from ``dspex_celery`` imports this module), so ``program.py`` never imports the client.
- With dspy installed, the ``Program`` exported here (``dspex_celery.Program``) is
  :class:`~dspex_celery.integrations.dspy_program.DspyProgram`, a ``dspy.Module``: DSPy's tools
  (``Evaluate``, ``batch``, ``acall``, ``save``/``load``, optimizers) take it.
- Batch runs score lines with a DSPy metric: :func:`make_example` and :func:`make_prediction`.

Plan-time checks live in :mod:`~dspex_celery.integrations.dspy_plan`, the worker's LMs, state and
transient errors in :mod:`~dspex_celery.integrations.dspy_worker`. ``dspy`` is imported only when
a program uses it: the core works without the ``[dspy]`` extra.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

from dspex_celery.client import ExecutionHandle, asubmit_program, submit_program
from dspex_celery.integrations.dspy_plan import dspy_available
from dspex_celery.integrations.dspy_values import Outputs, make_example, make_prediction
from dspex_celery.integrations.dspy_worker import read_trace
from dspex_celery.program import TRACE_OPTION
from dspex_celery.program import Program as BaseProgram

__all__ = ["Outputs", "Program", "arun_program", "make_example", "make_prediction", "run_program"]


def run_program(program: BaseProgram, inputs: dict[str, Any], options: Mapping[str, Any]) -> Any:
    """Run ``program`` (embedded unless ``options``/settings name a cluster) and return a Prediction.

    ``options`` are ``submit_program`` keywords (``app``, ``strategy``, ``timeout``) and maybe
    :data:`~dspex_celery.program.TRACE_OPTION`; a failed execution raises
    :class:`~dspex_celery.errors.ExecutionFailed`.
    """
    keywords, on_trace = _split_trace_option(options)
    handle = submit_program(program, inputs, **keywords, dspy_trace=on_trace is not None)
    prediction = make_prediction(handle.get().outputs)
    _give_traces(handle, on_trace)
    return prediction


async def arun_program(program: BaseProgram, inputs: dict[str, Any], options: Mapping[str, Any]) -> Any:
    """:func:`run_program`, awaited: no thread waits for the execution (``asubmit_program``, ``get_async``)."""
    keywords, on_trace = _split_trace_option(options)
    handle = await asubmit_program(program, inputs, **keywords, dspy_trace=on_trace is not None)
    prediction = make_prediction((await handle.get_async()).outputs)
    _give_traces(handle, on_trace)
    return prediction


def _split_trace_option(options: Mapping[str, Any]) -> tuple[dict[str, Any], Callable[..., None] | None]:
    """The ``submit_program`` keywords of ``options`` and its :data:`TRACE_OPTION` callable (or None)."""
    keywords = dict(options)
    return keywords, keywords.pop(TRACE_OPTION, None)


def _give_traces(handle: ExecutionHandle, on_trace: Callable[..., None] | None) -> None:
    """Hand ``on_trace`` the reader of the succeeded execution's stored DSPy traces, by module name."""
    if on_trace is not None:
        on_trace(functools.partial(read_trace, handle.runtime.store, handle.execution_id))


BaseProgram.runner = run_program
BaseProgram.async_runner = arun_program

#: ``dspex_celery.Program``: a ``dspy.Module`` when the [dspy] extra is installed (importing dspy costs ~0.5 s).
Program: type[BaseProgram] = BaseProgram
if dspy_available():
    from dspex_celery.integrations.dspy_program import DspyProgram

    Program = DspyProgram
