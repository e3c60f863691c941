"""DSPy programs on dspex-celery.

- Plan time (client): ``dspy:`` settings (program-wide, overridden per module) are merged into each
  module's plan, ``state:`` paths are made absolute against the program file's folder, and the
  state files and LM/adapter factories are checked.
- Worker: the LM (and adapter) are built once per process by calling the factories, and the module
  runs inside ``dspy.context(lm=..., adapter=...)`` (DSPy lets only the configuring thread call
  ``dspy.configure``, so workers never rely on it). ``state:`` is loaded with the module's own
  ``load(path)`` (JSON; DSPy refuses pickles unless asked).
- Client: ``Program.forward`` / ``Program(...)`` return a ``dspy.Prediction``;
  ``Program.add_module(name, module_instance)`` saves the instance's state as JSON and refers to it.
- Retries: LM rate-limit, overload and connection errors count as transient.

``dspy`` is imported only when a program uses it: the core works without the ``[dspy]`` extra.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from dspex_celery.errors import (
    DspyMissing,
    LMFactoryError,
    ModuleStateError,
    ProgramError,
    UsageError,
)
from dspex_celery.graph import UsesRefused, resolve_uses
from dspex_celery.results import describe_failure  # noqa: F401 (batch.py imports it from here)

if TYPE_CHECKING:
    from dspex_celery.plan import ModulePlan
    from dspex_celery.program import Program
    from dspex_celery.spec import ModuleSpec, ProgramSpec

INSTALL_HINT = "pip install 'dspex-celery[dspy]'"
FACTORY_KEYS = ("lm", "adapter")
#: Where ``add_module(name, module_instance)`` saves instance state (relative to the cwd).
DEFAULT_STATE_DIR = Path(".dspex") / "state"

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


def require_dspy(who: str) -> ModuleType:
    """The ``dspy`` package, or :class:`DspyMissing` naming ``who`` needs it and how to install it."""
    try:
        import dspy
    except ImportError as exc:
        raise DspyMissing(f"{who} needs dspy, which cannot be imported ({exc}): {INSTALL_HINT}") from None
    return dspy


def dspy_available() -> bool:
    try:
        import dspy
    except ImportError:
        return False
    return dspy is not None


# --- plan time ------------------------------------------------------------------------------------


def dspy_factories(settings: Mapping[str, str]) -> list[str]:
    """The factory paths (``package.module:callable``) named by a module's ``dspy`` settings."""
    return [settings[key] for key in FACTORY_KEYS if settings.get(key)]


def spec_factories(spec: ProgramSpec) -> list[str]:
    """Every factory path a program's ``dspy`` settings name (program-wide and per module)."""
    settings = [spec.dspy, *(module.dspy for module in spec.modules.values())]
    return [path for item in settings if item for path in dspy_factories(item.model_dump(exclude_none=True))]


def state_path(state: str | None, base_dir: Path | None) -> str | None:
    """``state:`` as an absolute path; a relative one is relative to ``base_dir`` (else the cwd)."""
    if state is None:
        return None
    path = Path(state).expanduser()
    return str(path if path.is_absolute() else ((base_dir or Path.cwd()) / path).resolve())


def dspy_settings(spec: ProgramSpec, module: ModuleSpec) -> dict[str, str]:
    """A module's ``dspy`` settings: its own keys win over the program's.

    The program's apply only to ``dspy.Module`` classes (a plain function module runs as it is
    unless it sets ``dspy:`` itself).
    """
    own = module.dspy
    if own is None and spec.dspy is None:
        return {}  # nothing DSPy about it (the common case)
    settings = own.model_dump(exclude_none=True) if own else {}
    if spec.dspy is not None and (own is not None or is_dspy_module(module.uses)):
        settings = {**spec.dspy.model_dump(exclude_none=True), **settings}
    return settings


def is_dspy_module(uses: str) -> bool:
    """True when ``uses`` names a ``dspy.Module`` subclass (or cannot be imported here to tell)."""
    try:
        target = resolve_uses(uses)
    except ImportError:
        return True
    dspy = sys.modules.get("dspy")  # importing a dspy.Module subclass imported dspy
    return dspy is not None and isinstance(target, type) and issubclass(target, dspy.Module)


def with_dspy_hint(error: ProgramError, spec: ProgramSpec) -> ProgramError:
    """``error`` plus an install hint when dspy is missing and the program needs it."""
    needs = bool(spec_factories(spec)) or any("dspy" in problem for problem in error.problems)
    if not needs or dspy_available():
        return error
    return ProgramError([*error.problems, f"dspy is not installed: {INSTALL_HINT}"], error.source)


def dspy_plan_problems(modules: Mapping[str, ModulePlan]) -> list[str]:
    """Missing state files, and (for modules with ``dspy`` settings) dspy and its factories."""
    special = {name: module for name, module in modules.items() if module.state is not None or module.dspy}
    problems = [
        f"module '{name}': state file {module.state} not found "
        "(a relative state path is relative to the program file's folder)"
        for name, module in special.items()
        if module.state is not None and not Path(module.state).is_file()
    ]
    factories = dict.fromkeys((key, path) for module in special.values() for key in FACTORY_KEYS
                              if (path := module.dspy.get(key)))
    if factories and not dspy_available():
        return [*problems, f"the program sets 'dspy' but dspy is not installed: {INSTALL_HINT}"]
    for key, path in factories:
        try:
            resolve_uses(path)
        except UsesRefused as exc:
            problems.append(f"dspy.{key} '{path}' is refused: {exc}")
        except ImportError as exc:
            problems.append(f"dspy.{key} '{path}' cannot be resolved ({exc})")
    return problems


# --- worker ---------------------------------------------------------------------------------------

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
        import dspy

        with dspy.context(**self.settings):
            return self.function(**kwargs)


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
    return bool(classes) and any(isinstance(exc, classes) for exc in _causes(error))


def _causes(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


# --- client: predictions, examples, Program.forward ----------------------------------------------


class Outputs(dict[str, Any]):
    """Program outputs with attribute access, when dspy (and so ``dspy.Prediction``) is absent."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"no output '{name}' (outputs: {', '.join(self) or 'none'})") from None

    def toDict(self) -> dict[str, Any]:
        return dict(self)


def make_prediction(outputs: Mapping[str, Any]) -> Any:
    """``dspy.Prediction(**outputs)`` when dspy is installed, else :class:`Outputs`."""
    if dspy_available():
        import dspy

        return dspy.Prediction(**outputs)
    return Outputs(outputs)


def make_example(inputs: Mapping[str, Any], labels: Mapping[str, Any]) -> Any:
    """A ``dspy.Example`` (inputs marked with ``with_inputs``) or a plain attribute mapping."""
    if dspy_available():
        import dspy

        return dspy.Example(**inputs, **labels).with_inputs(*inputs)
    return Outputs({**inputs, **labels})


def run_program(program: Program, inputs: dict[str, Any], options: Mapping[str, Any]) -> Any:
    """Run ``program`` (embedded unless ``options``/settings name a cluster) and return a Prediction.

    ``options`` are ``submit_program`` keywords (``app``, ``strategy``, ``timeout``); a failed
    execution raises :class:`ExecutionFailed`.
    """
    from dspex_celery.client import submit_program

    return make_prediction(submit_program(program, inputs, **options).get().outputs)


# --- client: a dspy.Module instance as a program module -------------------------------------------


def module_reference(name: str, instance: Any, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``uses`` and module keys for a ``dspy.Module`` instance given to ``Program.add_module``.

    Workers rebuild it as ``Class(**with_)`` and load the instance's state, saved as JSON under
    ``options['state_dir']`` (default ``.dspex/state``). Raises :class:`UsageError` when the class
    is not importable by workers or the rebuilt module's state differs from the instance's.
    """
    dspy = require_dspy(f"add_module('{name}', <{type(instance).__name__} instance>)")
    if not isinstance(instance, dspy.Module):
        raise UsageError(
            f"add_module('{name}'): expected 'package.module:attribute' or a dspy.Module instance, "
            f"got {type(instance).__name__}"
        )
    options = dict(options)
    state_dir = Path(options.pop("state_dir", None) or DEFAULT_STATE_DIR)
    with_ = options.get("with_", options.get("with", {}))
    uses = _importable_class_path(name, type(instance))
    state = instance.dump_state()
    if _rebuilt_state(name, type(instance), with_, None) != state:
        options["state"] = _save_state(name, instance, state, state_dir)
        if _rebuilt_state(name, type(instance), with_, options["state"]) != state:
            raise UsageError(
                f"add_module('{name}'): {uses}(**{with_!r}) loaded with the saved state does not match "
                "the instance: pass the constructor's keyword arguments as with_={...}"
            )
    return uses, options


def _importable_class_path(name: str, cls: type) -> str:
    if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
        raise UsageError(
            f"add_module('{name}'): class {cls.__qualname__} is defined in {cls.__module__} "
            "(or inside a function), which workers cannot import: move it to an importable module"
        )
    return f"{cls.__module__}:{cls.__qualname__}"


def _rebuilt_state(name: str, cls: type, with_: Mapping[str, Any], state: str | None) -> Any:
    try:
        rebuilt = cls(**with_)
    except Exception as exc:  # the user's constructor may raise anything
        raise UsageError(
            f"add_module('{name}'): workers cannot build {cls.__qualname__}(**{dict(with_)!r}) "
            f"({type(exc).__name__}: {exc}): pass its constructor's keyword arguments as with_={{...}}"
        ) from None
    if state is not None:
        rebuilt.load(state)
    return rebuilt.dump_state()


def _save_state(name: str, instance: Any, state: Any, state_dir: Path) -> str:
    try:
        digest = hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()[:16]
    except (TypeError, ValueError) as exc:
        raise UsageError(f"add_module('{name}'): the module's state is not JSON ({exc})") from None
    path = (state_dir / f"{name}-{digest}.json").resolve()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.stem}.{os.getpid()}.json")  # DSPy saves JSON by suffix
        instance.save(str(partial))
        partial.replace(path)
    return str(path)
