"""Settings precedence: flags, then DSPEX_* environment, then the config file."""

from __future__ import annotations

from pathlib import Path

import pytest

from dspex_celery.errors import ConfigError
from dspex_celery.settings import load_settings
from dspex_celery.app import celery_config


@pytest.fixture
def config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "dspex.yaml"
    path.write_text("broker_url: redis://from-file:6379/0\nnamespace: filens\nmodules: pkg_file\n")
    monkeypatch.setenv("DSPEX_CONFIG", str(path))
    for name in ("DSPEX_BROKER_URL", "DSPEX_NAMESPACE", "DSPEX_MODULES", "DSPEX_RESULT_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    return path


def test_config_file_is_read(config_file: Path) -> None:
    settings = load_settings()
    assert settings.broker_url == "redis://from-file:6379/0" and settings.namespace == "filens"
    assert settings.allowed_packages == ("pkg_file",)


def test_env_beats_file_and_flags_beat_env(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSPEX_BROKER_URL", "redis://from-env:6379/0")
    monkeypatch.setenv("DSPEX_MODULES", "a, b.c")
    assert load_settings().broker_url == "redis://from-env:6379/0"
    assert load_settings().allowed_packages == ("a", "b.c")
    assert load_settings(broker_url="redis://from-flag:6379/0").broker_url == "redis://from-flag:6379/0"
    assert load_settings(broker_url=None).broker_url == "redis://from-env:6379/0"  # an unset flag


def test_json_only_and_late_acks(config_file: Path) -> None:
    config = celery_config(load_settings())
    assert config["accept_content"] == ["json"] and config["task_serializer"] == "json"
    assert config["result_accept_content"] == ["json"]
    assert config["task_acks_late"] and config["task_reject_on_worker_lost"]
    assert config["worker_prefetch_multiplier"] == 1


def test_non_redis_result_backend_is_refused(config_file: Path) -> None:
    settings = load_settings(broker_url="amqp://guest:guest@127.0.0.1:5672//")
    with pytest.raises(ConfigError, match="DSPEX_RESULT_BACKEND"):
        celery_config(settings)
    with pytest.raises(ConfigError, match="is not Redis"):
        celery_config(load_settings(result_backend="rpc://"))
