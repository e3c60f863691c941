"""DSPy on the worker: LMs and adapters built once per process, ``dspy.context``, state, retries.

- The LM (and adapter) are built once per process by calling the factories, and the module runs
  inside ``dspy.context(lm=..., adapter=...)`` (DSPy lets only the configuring thread call
  ``dspy.configure``, so workers never rely on it).
- ``state:`` is loaded with the module's own ``load(path)`` (JSON; DSPy refuses pickles unless
  asked); a changed state file (new mtime) makes the worker rebuild the module.
- Retries: LM rate-limit, overload and connection errors count as transient.
- Usage: each call's LM tokens, cost and shared-cache hits are metered (``metered_call``) for its
  record; the shared LM cache (``lm_cache.py``) is installed on the first DSPy call when asked.
- Traces: under a client's active DSPy trace (meta ``dspy_trace``), a dspy module's predictor calls
  are stored by predictor name (``traced_call``) and appended to the client's trace (``append_trace``).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dspex_celery.errors import LMFactoryError, ModuleStateError
from dspex_celery.graph import resolve_uses
from dspex_celery.integrations.dspy_plan import FACTORY_KEYS, require_dspy
from dspex_celery.integrations.lm_cache import METER_SETTING, LMMeter, install_lm_cache
from dspex_celery.rate_limits import causes
from dspex_celery.usage import Usage

if TYPE_CHECKING:
    from dspex_celery.plan import ModulePlan
    from dspex_celery.results import ModuleRecord
    from dspex_celery.runtime import Runtime
    from dspex_celery.state import StateStore

#: LM client errors worth a retry with backoff, by module; only modules already imported count
#: (an error of a library that was never imported cannot have been raised).
TRANSIENT_LM_ERRORS: dict[str, tuple[str, ...]] = {
    "openai": ("RateLimitError", "APIConnectionError", "InternalServerError"),
    "litellm.exceptions": (
        "RateLimitError",
        "ServiceUnavailableError",
        "Timeout",
        "APIConnectionError",
        "InternalServerError",
    ),
    "anthropic": ("RateLimitError", "APIConnectionError", "InternalServerError"),
}

_built: dict[str, Any] = {}
_built_lock = threading.Lock()


def state_version(state: str | None) -> list[Any] | None:
    """The state path and its mtime: a worker reloads a module whose state file changed."""
    if state is None:
        return None
    try:
        return [state, os.stat(state).st_mtime_ns]
    except OSError:
        return [state, None]


def load_state(module: ModulePlan, instance: Any) -> None:
    """Load ``module.state`` into ``instance`` with its own ``load(path)``; clear errors otherwise."""
    path = str(module.state)
    load = getattr(instance, "load", None)
    if not callable(load):
        raise ModuleStateError(
            f"module '{module.name}': 'state' is set but {type(instance).__name__} has no load(path) method"
        )
    if not Path(path).is_file():
        raise ModuleStateError(
            f"module '{module.name}': state file {path} not found on this worker: "
            "workers need the file at the same path (shared volume or image)"
        )
    try:
        load(path)
    except Exception as exc:  # the module's own loader may raise anything
        raise ModuleStateError(
            f"module '{module.name}': cannot load state {path} ({type(exc).__name__}: {exc})"
        ) from exc


def build_factory(module: ModulePlan, key: str, path: str) -> Any:
    """The LM or adapter made by the factory at ``path``, built once per process."""
    with _built_lock:
        if path not in _built:
            _built[path] = _call_factory(module, key, path)
        return _built[path]


def _call_factory(module: ModulePlan, key: str, path: str) -> Any:
    dspy = require_dspy(f"module '{module.name}' (dspy.{key} '{path}')")
    where = f"module '{module.name}': dspy.{key} factory '{path}'"
    try:
        factory = resolve_uses(path)
    except ImportError as exc:
        raise LMFactoryError(f"{where} cannot be imported ({exc})") from exc
    try:
        built = factory()
    except Exception as exc:  # a user factory may raise anything
        raise LMFactoryError(
            f"{where} failed ({type(exc).__name__}: {exc}): fix the factory or its settings (model, API key)"
        ) from exc
    expected = dspy.BaseLM if key == "lm" else dspy.Adapter
    if not isinstance(built, expected):
        raise LMFactoryError(f"{where} returned {type(built).__name__}, not a {expected.__name__}")
    return built


class DspyCall:
    """A module callable that runs inside ``dspy.context(**settings)`` (thread- and task-local)."""

    def __init__(self, function: Callable[..., Any], settings: dict[str, Any]) -> None:
        self.function = function
        self.settings = settings
        self.__wrapped__ = function

    def __call__(self, **kwargs: Any) -> Any:
        import dspy  # optional dependency: only a module with dspy settings gets here (its factory needed it)

        with dspy.context(**self.settings):
            return self.function(**kwargs)

    def metered(self, meter: LMMeter, **kwargs: Any) -> Any:
        """The call, with its LM usage (DSPy's usage tracker, LM history, cache lookups) in ``meter``."""
        import dspy  # optional dependency: as in __call__

        callers = [meter.history, *(dspy.settings.caller_modules or [])]
        with dspy.context(**self.settings, usage_tracker=meter.tracker, caller_modules=callers,
                          **{METER_SETTING: meter}):
            return self.function(**kwargs)


def metered_call(function: Callable[..., Any], runtime: Runtime) -> tuple[Callable[..., Any], LMMeter | None]:
    """``function`` and the meter of its LM usage when it is a DSPy module call (with the shared LM
    cache installed first when the settings ask for it); ``function`` and None otherwise."""
    if not isinstance(function, DspyCall):
        return function, None
    install_lm_cache(runtime)
    meter = LMMeter()
    return functools.partial(function.metered, meter), meter


def wrap_dspy(module: ModulePlan, function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` as is, or wrapped in a :class:`DspyCall` when the module has ``dspy`` settings."""
    if not module.dspy:
        return function
    settings = {key: build_factory(module, key, path) for key in FACTORY_KEYS if (path := module.dspy.get(key))}
    return DspyCall(function, settings)


def lm_transient_errors() -> tuple[type[BaseException], ...]:
    """The LM client error classes (of libraries already imported) that deserve a retry."""
    classes: list[type[BaseException]] = []
    for module_name, names in TRANSIENT_LM_ERRORS.items():
        library = sys.modules.get(module_name)
        for name in names if library is not None else ():
            cls = getattr(library, name, None)
            if isinstance(cls, type) and issubclass(cls, BaseException):
                classes.append(cls)
    return tuple(classes)


def is_lm_transient(error: BaseException) -> bool:
    """True for an LM rate-limit/overload/connection error, or one raised from such an error."""
    classes = lm_transient_errors()
    return bool(classes) and any(isinstance(exc, classes) for exc in causes(error))


def usage_fields(record: ModuleRecord, meter: LMMeter | None) -> dict[str, Any]:
    """The usage fields of ``record`` with the metered call's added (none without a meter)."""
    return {} if meter is None else (Usage.of(record) + meter.usage()).record_fields()


# --- DSPy traces for the client's optimizers (BootstrapFewShot) -------------------------------------

#: The execution meta flag set by a client that runs under an active DSPy trace: its dspy modules' traces are kept.
TRACE_META = "dspy_trace"
#: The execution key part of the hash of traced modules' and calls' DSPy traces (name -> JSON entries).
TRACE_KEY = "calls:trace"


def traced(store: StateStore, execution_id: str, name: str, loaded: Any,
           function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` storing the DSPy trace of the predictors of ``loaded`` (a module's callable, maybe a
    :class:`DspyCall`) under ``name``; ``function`` as is when ``loaded`` is no ``dspy.Module``."""
    target = getattr(loaded, "__wrapped__", loaded)
    if not callable(getattr(target, "named_predictors", None)):
        return function
    return functools.partial(traced_call, store, execution_id, name, target, function)


def traced_call(store: StateStore, execution_id: str, name: str, target: Any, function: Callable[..., Any],
                *args: Any, **kwargs: Any) -> Any:
    """``function(*args, **kwargs)``, storing the DSPy trace of ``target``'s predictors (by predictor name)
    for the client, whose optimizer (BootstrapFewShot) reads it as if the call had run there."""
    import dspy  # optional dependency: only dspy.Modules get here

    with dspy.context(trace=[]):
        result = function(*args, **kwargs)
        steps = list(dspy.settings.trace)
    names = {id(predictor): path for path, predictor in target.named_predictors()}
    entries = [[names[id(predictor)], dict(inputs), _plain(outputs)] for predictor, inputs, outputs in steps
               if id(predictor) in names]
    try:
        text = json.dumps(entries)
    except (TypeError, ValueError):  # a trace that is not JSON is not sent (the call's output is checked)
        return result
    key = store.key(execution_id, TRACE_KEY)
    pipe = store.client.pipeline()
    pipe.hset(key, name, text)
    pipe.expire(key, store.ttl_s)
    pipe.execute()
    return result


def _plain(outputs: Any) -> Any:
    return dict(outputs.toDict()) if hasattr(outputs, "toDict") else outputs


def read_trace(store: StateStore, execution_id: str, name: str) -> list[list[Any]]:
    """The trace entries ``[predictor name, inputs, outputs]`` a traced module or call stored."""
    raw = store.client.hget(store.key(execution_id, TRACE_KEY), name)
    return [] if raw is None else list(json.loads(raw))


def append_trace(trace: list[Any], predictors: dict[str, Any], entries: list[list[Any]]) -> None:
    """Append stored trace ``entries`` to a DSPy ``trace`` as ``(predictor, inputs, Prediction)`` with
    this process's ``predictors`` (by name); entries of unknown predictors are left out."""
    import dspy  # optional dependency: only a client tracing dspy modules gets here

    for name, inputs, outputs in entries:
        if name in predictors:
            trace.append((predictors[name], inputs, dspy.Prediction(**outputs)))
