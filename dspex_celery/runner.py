"""Running one module in-process: allow-list check, loading, input resolution, output checks."""

from __future__ import annotations

import functools
import inspect
import json
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any, cast

from celery.utils.time import get_exponential_backoff_interval

from dspex_celery.errors import ModuleImportError, ModuleInputError, ModuleNotAllowed, ModuleOutputError
from dspex_celery.graph import UsesRefused, is_allowed, package_of, resolve_uses
from dspex_celery.integrations.dspy_plan import dspy_factories
from dspex_celery.integrations.dspy_worker import load_state, state_version, wrap_dspy
from dspex_celery.plan import ModulePlan
from dspex_celery.spec import RetryPolicy, parse_ref, unescape

log = logging.getLogger(__name__)

_instances: dict[str, Callable[..., Any]] = {}
_instances_lock = threading.Lock()
#: ``(uses, allowed)`` pairs that resolved within the allow-list: checked once per process (a module
#: imported stays imported, like the instances :func:`load_callable` keeps).
_resolved_allowed: set[tuple[str, tuple[str, ...]]] = set()


def check_allowed(module: ModulePlan, allowed: tuple[str, ...], program: str = "?") -> None:
    """Refuse (:class:`ModuleNotAllowed`, logged at WARNING) a module whose ``uses`` or DSPy factories
    name anything not defined in the allow-listed packages; nothing outside them is imported."""
    for uses in (module.uses, *dspy_factories(module.dspy)):
        refusal = _refusal(uses, allowed)
        if refusal is not None:
            error = ModuleNotAllowed(f"module '{module.name}': '{uses}' is not allowed on this worker{refusal}")
            log.warning("program '%s': %s", program, error)
            raise error


def _refusal(uses: str, allowed: tuple[str, ...]) -> str | None:
    """Why ``uses`` may not run with ``allowed``, or None (also when it does not import: loading says so)."""
    if not is_allowed(uses, allowed):
        return (f" (allow-listed packages: {', '.join(allowed) or 'none'}); start the worker with --modules "
                f"{package_of(uses)} if you trust that module")
    if (uses, allowed) in _resolved_allowed:
        return None
    try:
        resolve_uses(uses, allowed)
    except UsesRefused as exc:
        return f": {exc}"
    except ImportError:
        return None
    _resolved_allowed.add((uses, allowed))
    return None


def load_callable(module: ModulePlan) -> Callable[..., Any]:
    """The callable for a module: classes are instantiated once per process with ``with:``."""
    cache_key = json.dumps([module.uses, module.with_, state_version(module.state), module.dspy], sort_keys=True)
    with _instances_lock:
        if cache_key not in _instances:
            _instances[cache_key] = wrap_dspy(module, _instantiate(module))
        return _instances[cache_key]


def _instantiate(module: ModulePlan) -> Callable[..., Any]:
    try:
        target = resolve_uses(module.uses)
    except ImportError as exc:
        raise ModuleImportError(f"module '{module.name}': {exc}") from exc
    if inspect.isclass(target):
        instance: Any = target(**module.with_)
        if module.state is not None:
            load_state(module, instance)
        return cast(Callable[..., Any], instance)
    return functools.partial(target, **module.with_) if module.with_ else target


def resolve_inputs(
    module: ModulePlan,
    program_inputs: Mapping[str, Any],
    upstream: Mapping[str, Mapping[str, Any]],
) -> dict[str, Any]:
    """The keyword arguments for a module call, from program inputs and upstream outputs."""
    if module.inputs is None:
        merged = dict(program_inputs)
        for parent in module.depends_on:
            merged.update(upstream.get(parent, {}))
        return merged
    return {key: _resolve(module, key, value, program_inputs, upstream) for key, value in module.inputs.items()}


def _resolve(
    module: ModulePlan,
    key: str,
    value: Any,
    program_inputs: Mapping[str, Any],
    upstream: Mapping[str, Mapping[str, Any]],
) -> Any:
    if isinstance(value, list):
        return [_resolve(module, key, item, program_inputs, upstream) for item in value]
    if isinstance(value, dict):
        return {k: _resolve(module, key, item, program_inputs, upstream) for k, item in value.items()}
    if not isinstance(value, str):
        return value
    ref = parse_ref(value)
    if ref is None:
        return unescape(value)
    source = program_inputs if ref.is_input else upstream.get(ref.source)
    if source is None:
        raise ModuleInputError(f"module '{module.name}' input '{key}': {ref.source} produced no output")
    if ref.field is None:
        return dict(source)
    if ref.field not in source:
        fields = ", ".join(sorted(source)) or "none"
        raise ModuleInputError(
            f"module '{module.name}' input '{key}' refers to {ref}, but '{ref.source}' returned "
            f"no field '{ref.field}' (fields: {fields})"
        )
    return source[ref.field]


def normalize_output(module: ModulePlan, result: Any) -> dict[str, Any]:
    """A module's return value as a JSON-able dict, or a clear :class:`ModuleOutputError`."""
    output = _as_mapping(result)
    if output is None:
        raise ModuleOutputError(
            f"module '{module.name}' returned {type(result).__name__}; "
            "return a mapping of output names to values (dict, pydantic model or Prediction)"
        )
    for field, value in output.items():
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ModuleOutputError(_not_json(module, field, value)) from exc
    return output


def _not_json(module: ModulePlan, field: str, value: Any) -> str:
    """Why output ``field`` cannot be JSON: NaN/Infinity (JSON has no such numbers) or its type."""
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return (f"module '{module.name}' output '{field}' is not JSON-serialisable "
                f"({type(value).__name__}): return JSON types (str, number, bool, list, dict, None)")
    return (f"module '{module.name}' output '{field}' holds NaN or Infinity, which JSON cannot carry: "
            "return a finite number or None")


def _as_mapping(result: Any) -> dict[str, Any] | None:
    if isinstance(result, Mapping):
        return {str(key): value for key, value in result.items()}
    if hasattr(result, "model_dump"):
        return dict(result.model_dump(mode="json"))
    if hasattr(result, "toDict"):
        return dict(result.toDict())
    return None


def backoff_delay(policy: RetryPolicy, attempt: int, visibility_timeout_s: float) -> float:
    """Seconds before the attempt after ``attempt``: ``backoff_s * 2**(attempt-1)``, at most
    ``max_backoff_s`` and half the broker's visibility timeout (a longer countdown would be
    re-delivered while it waits: Celery #3270), with full jitter (uniform in 0..that) if asked."""
    if policy.backoff_s <= 0:
        return 0.0
    ceiling = min(policy.max_backoff_s, visibility_timeout_s / 2)
    delay_ms = get_exponential_backoff_interval(  # Celery's helper works in whole units: milliseconds
        factor=round(policy.backoff_s * 1000), retries=attempt - 1, maximum=round(ceiling * 1000),
        full_jitter=policy.jitter,
    )
    return float(delay_ms) / 1000
