"""Settings: command-line flags, then ``DSPEX_*`` environment variables, then the config file."""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    YamlConfigSettingsSource,
)

from dspex_celery import defaults
from dspex_celery.errors import ConfigError


#: An absolute dotted Python package name (an allow-list entry).
_PACKAGE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def config_file() -> Path:
    """The YAML config file in force: ``DSPEX_CONFIG`` or ``config/dspex.yaml`` in the cwd."""
    return Path(os.environ.get("DSPEX_CONFIG", defaults.CONFIG_FILE))


class CheckedYamlSource(YamlConfigSettingsSource):
    """The config file, whose every key must be a setting: a misspelt ``brokr_url:`` would otherwise
    be ignored and the command would run in-process instead of on the cluster."""

    def __call__(self) -> dict[str, Any]:
        data = super().__call__()
        known = set(self.settings_cls.model_fields)
        for name in data:
            if name not in known:
                close = difflib.get_close_matches(str(name), sorted(known), n=1)
                hint = f"did you mean '{close[0]}'?" if close else "README: Running on a cluster lists the settings"
                raise ConfigError(f"config file {config_file()}: unknown setting '{name}' ({hint}): fix or remove it")
        return data


class Settings(BaseSettings):
    """Deployment settings shared by clients, workers and the listener."""

    model_config = SettingsConfigDict(env_prefix="DSPEX_", extra="ignore", frozen=True)

    broker_url: str | None = Field(default=None, description="Celery broker; none = embedded.")
    result_backend: str | None = Field(
        default=None,
        description="Redis URL of results + state: redis://, rediss://, unix://, redis-cluster://HOST:PORT[,HOST:PORT...] "
        "(a Redis Cluster) or sentinel://HOST:PORT[;sentinel://...] (with sentinel_master).",
    )
    sentinel_master: str | None = Field(
        default=None,
        description="The master name Sentinel monitors, for sentinel:// result backend and broker URLs.",
    )
    modules: str = Field(default="", description="Comma-separated allow-listed packages.")
    namespace: str = defaults.NAMESPACE
    state_ttl_s: int = Field(default=defaults.STATE_TTL_S, gt=0, description="Seconds execution state lives.")
    visibility_timeout_s: int = Field(default=defaults.VISIBILITY_TIMEOUT_S, gt=0)
    embedded_concurrency: int = Field(default=defaults.EMBEDDED_CONCURRENCY, ge=1)
    history_url: str | None = None
    resources: dict[str, dict[str, Any]] = Field(default_factory=dict)
    sent_events: bool = Field(
        default=False,
        description="Send Celery's task-sent event per dispatched task (Flower then shows queued tasks); "
        "off like Celery's default: it costs one more publish per module.",
    )
    hooks: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(),
        description="Hooks every runtime installs after the built-in ones: package.module:factory paths "
        "(a list, or comma-separated in DSPEX_HOOKS), allow-listed like program modules.",
    )
    dag_continuation: int = Field(
        default=8, ge=0,
        description="dag: how many ready children in a row a worker runs itself in the slot that just finished "
        "their parent (no broker round trip); 0 = every child goes through the broker. The bound keeps other "
        "executions' queued modules from waiting behind one long chain.",
    )
    learned_timeouts: bool = Field(
        default=False,
        description="Apply the optimizer's learned timeouts where a program sets no timeout_s (a program's "
        "'timeouts:' key and run --learned-timeouts/--no-learned-timeouts decide first); off: a profile "
        "changes priorities only.",
    )
    lm_cache: Literal["off", "redis"] = Field(
        default="off",
        description="Shared LM cache on workers: 'redis' answers identical DSPy LM requests anywhere in the "
        "cluster once (JSON entries in the state store's Redis); 'off' leaves DSPy's own per-process cache.",
    )
    lm_cache_ttl_s: int = Field(default=defaults.LM_CACHE_TTL_S, gt=0, description="Seconds an LM cache entry lives.")
    lm_cache_max_entries: int = Field(
        default=defaults.LM_CACHE_MAX_ENTRIES, gt=0,
        description="Entries the LM cache keeps; the least recently used are evicted beyond it.",
    )

    @field_validator("hooks", mode="before")
    @classmethod
    def _split_hooks(cls, value: Any) -> Any:
        """``DSPEX_HOOKS=a.b:f,c.d:g`` (or one string in the config file) is a list of paths."""
        if isinstance(value, str):
            return tuple(path.strip() for path in value.split(",") if path.strip())
        return value

    @field_validator("modules")
    @classmethod
    def _package_names(cls, value: str) -> str:
        """Every allow-listed entry is an absolute dotted package name (not a path, not relative)."""
        bad = [name.strip() for name in value.split(",") if name.strip() and not _PACKAGE.fullmatch(name.strip())]
        if bad:
            raise ValueError(f"{', '.join(map(repr, bad))} is not a package name: name packages as "
                             "dotted Python names, e.g. --modules my_pipeline.modules")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        yaml_source = CheckedYamlSource(settings_cls, yaml_file=config_file())
        return init_settings, env_settings, yaml_source

    @property
    def embedded(self) -> bool:
        """True when no broker is configured: run everything in this process."""
        return not self.broker_url

    @property
    def state_url(self) -> str | None:
        """Redis URL of the execution state store (the result backend, else a Redis broker)."""
        if self.result_backend:
            return self.result_backend
        if self.broker_url and self.broker_url.startswith(("redis://", "rediss://", "sentinel://")):
            return self.broker_url
        return None

    @property
    def allowed_packages(self) -> tuple[str, ...]:
        return tuple(name.strip() for name in self.modules.split(",") if name.strip())


#: What a password in a URL becomes wherever the URL is printed or logged.
PASSWORD_MASK = "***"


def redact(url: str | None) -> str:
    """``url`` with its password masked (``redis://:***@host/0``); lists of URLs (``;`` or ``,``) too.

    The rest of the URL (user, host, path, query) is kept, so the line still names the server.
    """
    if not url:
        return str(url)
    return "".join(_redact_one(part) for part in _URL_LIST.split(url))


#: A separator of a URL list: ``;`` or ``,`` where the next URL (a scheme) starts.
_URL_LIST = re.compile(r"([;,])(?=[A-Za-z][A-Za-z0-9+.-]*://)")


#: A query parameter that carries a secret (redis-py takes ``?password=``, Sentinel ``sentinel_password``).
_SECRET_PARAM = re.compile(r"(?i)([?&;][^=&;#]*(?:pass|secret|token)[^=&;#]*=)[^&;#]*")


def _redact_one(url: str) -> str:
    return _SECRET_PARAM.sub(rf"\g<1>{PASSWORD_MASK}", _redact_userinfo(url))


def _redact_userinfo(url: str) -> str:
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # not a URL urllib can take apart (e.g. a bad port)
        return _mask_before_at(url)
    if password is not None:
        userinfo, _, host = parts.netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        return urlunsplit(parts._replace(netloc=f"{user}:{PASSWORD_MASK}@{host}"))
    if "@" in parts.netloc:  # a user without a password
        return url
    return _mask_before_at(url)  # e.g. no scheme, or a '/' in the password


def _mask_before_at(text: str) -> str:
    """Mask from the ``:`` after the user to the last ``@`` (when there is one)."""
    userinfo, at, host = text.rpartition("@")
    after_scheme = userinfo.find("://") + 3 if "://" in userinfo else 0
    colon = userinfo.find(":", after_scheme)
    if not at or colon < 0:
        return text
    return f"{userinfo[:colon + 1]}{PASSWORD_MASK}@{host}"


def load_settings(**overrides: Any) -> Settings:
    """Settings with the given flag values on top (``None`` flags are ignored); an invalid value is
    one :class:`ConfigError` naming the setting (``DSPEX_LM_CACHE=x`` -> ``lm_cache: Input should be ...``)."""
    try:
        return _urls_checked(Settings(**{key: value for key, value in overrides.items() if value is not None}))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, error['loc']))}: {error['msg']}" for error in exc.errors())
        raise ConfigError(f"invalid setting ({problems}): fix the DSPEX_* variable, flag or config file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config file {config_file()}: invalid YAML{where} ({problem}): fix it or set "
                          "DSPEX_CONFIG to another file") from None
    except SettingsError as exc:  # e.g. DSPEX_RESOURCES that is not JSON
        cause = f" ({exc.__cause__})" if exc.__cause__ else ""
        raise ConfigError(f"invalid setting: {exc}{cause}: fix the DSPEX_* variable") from None
    except ValueError as exc:  # the YAML source given a file that is not a mapping (a list, a string)
        if _config_is_a_mapping():
            raise
        raise ConfigError(f"config file {config_file()} must be a mapping of setting names to values "
                          "(broker_url: ..., namespace: ...): fix it or set DSPEX_CONFIG to another file") from exc


#: Schemes whose URL path is a Redis database number (``redis://host:port/DB``).
_REDIS_DB_SCHEMES = ("redis", "rediss", "sentinel")
#: What the broker and result-backend settings are called on the command line.
_URL_FLAGS = {"broker_url": "--broker", "result_backend": "--result-backend"}


def _urls_checked(settings: Settings) -> Settings:
    """``settings``, once its broker and result-backend URLs have a numeric port and Redis database
    (clients would fail on them later, with a traceback, some only once a worker or a run is under way)."""
    for name, flag in _URL_FLAGS.items():
        for url in _URL_LIST.split(getattr(settings, name) or "")[::2]:
            if problem := _url_problem(url):
                raise ConfigError(f"{name} {redact(url)}: {problem}: fix {flag} (or DSPEX_{name.upper()})")
    return settings


def _url_problem(url: str) -> str | None:
    parts = urlsplit(url)
    if parts.scheme.startswith("redis-cluster") or "," in parts.netloc:  # host lists: checked where parsed
        return None
    try:
        parts.port  # noqa: B018  (the property parses it)
    except ValueError:
        return f"the port after '{parts.hostname}:' is not a number"
    database = parts.path.strip("/")
    if parts.scheme in _REDIS_DB_SCHEMES and database and not database.isdigit():
        return f"the database '{database}' is not a number (redis://host:port/DB)"
    return None


def _config_is_a_mapping() -> bool:
    """Whether the config file in force is missing, empty or a mapping (what the YAML source can take)."""
    try:
        data = yaml.safe_load(config_file().read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return True
    return data is None or isinstance(data, dict)
