"""DSPy at plan time (pure floor): ``dspy:`` settings, ``state:`` paths and their checks.

- ``dspy:`` settings (program-wide, overridden per module) are merged into each module's plan,
  ``state:`` paths are made absolute against the program file's folder, and the state files and
  LM/adapter factories are checked.
- ``Program.add_module(name, module_instance)`` saves the instance's state as JSON and refers to it.

``dspy`` is imported only when a program uses it: the core works without the ``[dspy]`` extra.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from dspex_celery.errors import DspyMissing, ProgramError, UsageError
from dspex_celery.graph import UsesRefused, resolve_uses

if TYPE_CHECKING:
    from dspex_celery.plan import ModulePlan
    from dspex_celery.spec import ModuleSpec, ProgramSpec

INSTALL_HINT = "pip install 'dspex-celery[dspy]'"
FACTORY_KEYS = ("lm", "adapter")
#: Where ``add_module(name, module_instance)`` saves instance state (relative to the cwd).
DEFAULT_STATE_DIR = Path(".dspex") / "state"
#: How Python says ``import dspy`` failed: not installed, or blocked (``sys.modules['dspy'] = None``).
DSPY_IMPORT_FAILED = ("No module named 'dspy'", "import of dspy halted")


def require_dspy(who: str) -> ModuleType:
    """The ``dspy`` package, or :class:`DspyMissing` naming ``who`` needs it and how to install it."""
    try:
        import dspy  # optional dependency (the [dspy] extra): imported only when a program uses it
    except ImportError as exc:
        raise DspyMissing(f"{who} needs dspy, which cannot be imported ({exc}): {INSTALL_HINT}") from None
    return dspy


def dspy_available() -> bool:
    try:
        import dspy  # optional dependency (the [dspy] extra): imported only when a program uses it
    except ImportError:
        return False
    return dspy is not None


# --- settings and state paths ---------------------------------------------------------------------


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


# --- checks ---------------------------------------------------------------------------------------


def with_dspy_hint(error: ProgramError, spec: ProgramSpec) -> ProgramError:
    """``error`` with an install hint when dspy is missing and the program needs it; the hint
    replaces the problems that only say dspy cannot be imported (one line instead of one a module)."""
    needs = bool(spec_factories(spec)) or any("dspy" in problem for problem in error.problems)
    if not needs or dspy_available():
        return error
    others = [problem for problem in error.problems if not any(text in problem for text in DSPY_IMPORT_FAILED)]
    return ProgramError([*others, f"dspy is not installed: {INSTALL_HINT}"], error.source)


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


# --- a dspy.Module instance as a program module (Program.add_module) ------------------------------


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
