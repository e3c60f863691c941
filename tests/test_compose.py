"""docker-compose.yml: it validates, and every dspex-celery command and setting in it is real."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from dspex_celery.cli import cli
from dspex_celery.settings import Settings
from tests.conftest import ROOT

COMPOSE = ROOT / "docker-compose.yml"
SERVICES: dict[str, dict[str, Any]] = yaml.safe_load(COMPOSE.read_text())["services"]
# Services running the project's image, whose ENTRYPOINT is `dspex-celery` (CMD `worker`).
DSPEX = {name: service for name, service in SERVICES.items() if "workers/Dockerfile" in str(service.get("build"))}


def env_file_values(service: dict[str, Any]) -> dict[str, str]:
    values: dict[str, str] = {}
    for name in service.get("env_file", []):
        for line in (ROOT / name).read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                key, _, value = line.partition("=")
                values[key.strip()] = value.strip()
    return values


def command_of(argv: list[str]) -> tuple[click.Context, click.Command]:
    """Parse ``dspex-celery ARGV`` as the CLI would, without running it (raises on a bad option)."""
    group_ctx = cli.make_context("dspex-celery", list(argv), resilient_parsing=True)
    name, *rest = argv
    command = cli.get_command(group_ctx, name)
    assert command is not None, f"`dspex-celery {name}` is not a command (commands: {', '.join(cli.commands)})"
    return command.make_context(name, list(rest), parent=group_ctx), command


def test_the_expected_services_are_there() -> None:
    assert {"redis", "postgres", "worker-default", "worker-io", "worker-llm", "listener", "flower"} <= set(SERVICES)
    resources = {env_file_values(SERVICES[f"worker-{cls}"])["DSPEX_WORKER_RESOURCES"] for cls in ("default", "io", "llm")}
    assert resources == {"default", "io", "llm"}
    assert "5555" in str(SERVICES["flower"]["ports"]) and "DSPEX_FLOWER_BASIC_AUTH" in SERVICES["flower"]["environment"]
    assert "DSPEX_HISTORY_URL" in SERVICES["listener"]["environment"]


@pytest.mark.parametrize("service", sorted(DSPEX))
def test_compose_commands_are_real_cli_commands(service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    env = {**DSPEX[service].get("environment", {}), **env_file_values(DSPEX[service])}
    for key in [key for key in os.environ if key.startswith("DSPEX_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():  # options read their envvars while parsing, as in the container
        monkeypatch.setenv(key, str(value))
    _, command = command_of([str(part) for part in DSPEX[service].get("command", ["worker"])])
    # And every DSPEX_* variable it gets means something: a setting or an option of its command
    settings = {f"DSPEX_{name.upper()}" for name in Settings.model_fields}
    option_vars = {param.envvar for param in command.params if isinstance(param, click.Option) and param.envvar}
    unknown = sorted(key for key in env if key.startswith("DSPEX_") and key not in settings | option_vars)
    assert not unknown, f"service {service} sets {unknown}, which dspex-celery {command.name} does not read"


def test_unknown_command_or_option_is_caught() -> None:
    with pytest.raises(AssertionError, match="is not a command"):
        command_of(["listen"])
    with pytest.raises(click.UsageError):
        command_of(["worker", "--no-such-option"])


def compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True, check=False).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_docker_compose_config_validates(tmp_path: Path) -> None:
    compose = compose_cli()
    if compose is None:
        pytest.skip("neither the docker compose plugin nor docker-compose is installed")
    env = {key: value for key, value in os.environ.items() if key != "DSPEX_FLOWER_BASIC_AUTH"}
    ok = subprocess.run([*compose, "-f", str(COMPOSE), "config", "-q"], cwd=ROOT, capture_output=True, text=True,
                        env={**env, "DSPEX_FLOWER_BASIC_AUTH": "admin:secret"}, timeout=60, check=False)
    assert ok.returncode == 0, ok.stderr
    # Flower's credentials are mandatory: without them compose refuses, naming the variable
    missing = subprocess.run([*compose, "-f", str(COMPOSE), "config", "-q"], cwd=ROOT, capture_output=True,
                             text=True, env=env, timeout=60, check=False)
    assert missing.returncode != 0 and "DSPEX_FLOWER_BASIC_AUTH" in missing.stderr
