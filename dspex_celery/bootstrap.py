"""The composition root: the one place that wires a runtime together.

A runtime is the Celery app with the engine's tasks, the state store and the hooks. The hooks are
:data:`DEFAULT_HOOKS` (written once, here) followed by those the settings' ``hooks`` key names
(``hooks: [pkg.mod:factory]`` in the config file, or ``DSPEX_HOOKS=pkg.mod:factory,...``), so a
``dspex-celery worker`` installs user hooks too; ``create_runtime(hooks=[...])`` replaces them all.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence

from dspex_celery.app import make_app
from dspex_celery.backups import backup_hooks
from dspex_celery.breaker import breaker_hooks
from dspex_celery.errors import ConfigError
from dspex_celery.graph import UsesRefused, resolve_uses
from dspex_celery.history.hooks import history_hooks
from dspex_celery.hooks import Hook, HookChain
from dspex_celery.integrations.distribute_worker import register_call_task
from dspex_celery.redis_queues import RedisQueues
from dspex_celery.resources import limiter_hooks
from dspex_celery.runtime import Runtime
from dspex_celery.settings import Settings, load_settings
from dspex_celery.state import StateStore
from dspex_celery.tasks import register_tasks
from dspex_celery.tracing import tracing_hooks

#: Builds a plug-in's hooks for a runtime's settings (none when the plug-in is off).
HookFactory = Callable[[Settings], Sequence[Hook]]

#: The hooks every runtime installs, in order. Tracing comes first, so a module's span covers its
#: breaker check and slot wait; then the breaker: an open circuit fails the attempt before it waits
#: for a resource slot.
DEFAULT_HOOKS: tuple[HookFactory, ...] = (tracing_hooks, breaker_hooks, limiter_hooks, history_hooks, backup_hooks)


def create_runtime(settings: Settings | None = None, *, hooks: Iterable[Hook] | None = None) -> Runtime:
    """A runtime for ``settings`` (embedded when no broker is configured); its app knows it.

    ``hooks``: exactly these hooks instead of :func:`default_hooks` (to extend the defaults, pass
    ``[*default_hooks(settings), MyHook()]``, or call ``runtime.hooks.add(MyHook())`` before use).
    """
    settings = settings or load_settings()
    app = make_app(settings)
    register_tasks(app)
    register_call_task(app)  # distribute(): one sub-module call of a dspy.Module
    chain = HookChain(default_hooks(settings) if hooks is None else list(hooks))
    runtime = Runtime(settings, app, state_store(settings), chain, set(settings.allowed_packages),
                      queues=RedisQueues.of(settings, app))
    app.dspex_runtime = runtime
    return runtime


def state_store(settings: Settings) -> StateStore:
    """The execution state store: in this process when embedded, else the Redis result backend."""
    if settings.embedded:
        return StateStore.in_memory(settings.namespace, settings.state_ttl_s)
    assert settings.state_url is not None  # make_app checked it
    return StateStore.from_url(settings.state_url, settings.namespace, settings.state_ttl_s, settings.sentinel_master)


def default_hooks(settings: Settings) -> list[Hook]:
    """The hooks of :data:`DEFAULT_HOOKS`, then those named by the settings' ``hooks`` key."""
    built_in = [hook for factory in DEFAULT_HOOKS for hook in factory(settings)]
    return [*built_in, *configured_hooks(settings)]


def configured_hooks(settings: Settings) -> list[Hook]:
    """The hooks the ``hooks`` key names, each ``package.module:factory`` (one clear line if not)."""
    return [hook for path in settings.hooks for hook in load_hooks(path, settings)]


def load_hooks(path: str, settings: Settings) -> list[Hook]:
    """Call the factory at ``path`` (allow-listed like program modules) with ``settings``.

    The factory (a function, or a :class:`~dspex_celery.hooks.Hook` subclass) takes the settings
    and returns a hook or a list of hooks. Workers load only what an allow-listed package defines;
    an embedded runtime without an allow-list trusts the hook's own package, as it does programs.
    """
    if ":" not in path:
        raise ConfigError(f"hook '{path}' is not package.module:factory: fix `hooks:` in the config file or DSPEX_HOOKS")
    factory = _resolve_hook(path, settings)
    try:
        made = factory(settings)
    except Exception as exc:  # the user's factory: any error is theirs to fix
        raise ConfigError(f"hook '{path}' failed to start ({type(exc).__name__}: {exc})") from None
    made_list: list[object] = list(made) if isinstance(made, list | tuple) else [made]
    hooks = [hook for hook in made_list if isinstance(hook, Hook)]
    if not hooks or len(hooks) < len(made_list):
        raise ConfigError(f"hook '{path}' returned {type(made).__name__}, not a Hook: its factory takes the "
                          "Settings and returns a dspex_celery.hooks.Hook (or a list of them)")
    return hooks


def _resolve_hook(path: str, settings: Settings) -> Callable[..., object]:
    allowed = settings.allowed_packages or (None if settings.embedded else ())
    try:
        return resolve_uses(path, allowed)
    except UsesRefused as exc:
        package = path.partition(":")[0]
        raise ConfigError(f"hook '{path}' is refused ({exc}): add --modules {package} (or DSPEX_MODULES) "
                          "if you trust that module") from None
    except ImportError as exc:
        raise ConfigError(f"cannot load hook '{path}' ({exc}): fix `hooks:` in the config file or DSPEX_HOOKS") from None


_default_lock = threading.Lock()
_default: Runtime | None = None


def default_runtime() -> Runtime:
    """The process-wide runtime from settings (created on first use)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = create_runtime()
        return _default
