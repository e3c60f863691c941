"""docker-compose.yml: it validates, and every dspex-celery command and setting in it is real."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from click.testing import CliRunner

from dspex_celery.canvas import hard_time_limit
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


def compose_env(**extra: str) -> dict[str, str]:
    """This process's environment without the compose file's secrets (plus ``extra``)."""
    secrets = ("DSPEX_FLOWER_BASIC_AUTH", "POSTGRES_PASSWORD")
    return {**{key: value for key, value in os.environ.items() if key not in secrets}, **extra}


def test_docker_compose_config_validates_without_secrets() -> None:
    compose = compose_cli()
    if compose is None:  # no compose here: the file must at least ask for no variable at config time
        assert ":?" not in COMPOSE.read_text(), "a ${VAR:?...} makes `docker compose config` fail without it"
        return
    result = subprocess.run([*compose, "-f", str(COMPOSE), "config"], cwd=ROOT, capture_output=True, text=True,
                            env=compose_env(), timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)["services"]
    assert config["flower"]["environment"]["DSPEX_FLOWER_BASIC_AUTH"] in ("", None)


def test_flower_service_refuses_to_start_without_its_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given the flower service's environment as `docker compose up` passes it with no secret set
    for key in [key for key in os.environ if key.startswith("DSPEX_")]:
        monkeypatch.delenv(key)
    unset = re.compile(r"\$\{\w+:-([^}]*)\}")  # ${VAR:-default} with VAR unset: its default ("" for the secret)
    env = {key: unset.sub(r"\1", str(value)) for key, value in SERVICES["flower"]["environment"].items()}
    assert env["DSPEX_FLOWER_BASIC_AUTH"] == ""
    # When its command runs, Then it exits at once naming the variable to set
    result = CliRunner().invoke(cli, SERVICES["flower"]["command"], env=env)
    assert result.exit_code == 2
    assert "without authentication" in result.stderr and "DSPEX_FLOWER_BASIC_AUTH" in result.stderr


def seconds(duration: str) -> float:
    """A compose duration (``330s``, ``5m``, ``1m30s``; a ``${VAR:-default}`` taken at its default)."""
    if duration.startswith("${"):
        duration = duration.split(":-", 1)[1].rstrip("}")
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s)", duration)
    assert parts and "".join(number + unit for number, unit in parts) == duration, duration
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(float(number) * scale[unit] for number, unit in parts)


def longest_shipped_module_s() -> float:
    """The hard time limit of the longest module of the programs shipped in the image."""
    limits = [DEFAULT_MODULE_BUDGET_S]
    for path in [*ROOT.glob("examples/*.yaml"), *ROOT.glob("dspex_celery/examples/*.yaml")]:
        modules = (yaml.safe_load(path.read_text()) or {}).get("modules", {})
        limits += [hard_time_limit(module["timeout_s"]) for module in modules.values() if module.get("timeout_s")]
    return max(limits)


#: What the compose file promises to wait for a module that sets no timeout_s (its comment says so).
DEFAULT_MODULE_BUDGET_S = 300.0


def test_every_service_restarts_and_has_a_healthcheck() -> None:
    for name, service in SERVICES.items():
        assert service.get("restart") == "unless-stopped", name
        test = service.get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name} has no healthcheck"
        if test[1] == "dspex-celery":  # a real command of the CLI, with options it knows
            command_of(test[2:])
    assert SERVICES["worker-default"]["healthcheck"]["test"][1:] == ["dspex-celery", "ping"]
    assert SERVICES["listener"]["healthcheck"]["test"][1:] == ["dspex-celery", "ping", "--listener"]
    assert "/healthcheck" in " ".join(SERVICES["flower"]["healthcheck"]["test"])


def test_workers_get_longer_to_stop_than_the_longest_module() -> None:
    for name in ("worker-default", "worker-io", "worker-llm"):
        assert seconds(SERVICES[name]["stop_grace_period"]) > longest_shipped_module_s(), name


def test_redis_keeps_the_state_on_a_volume() -> None:
    redis = SERVICES["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    data_dir = command[command.index("--dir") + 1]
    volume, _, mount = redis["volumes"][0].partition(":")
    assert mount == data_dir and volume in yaml.safe_load(COMPOSE.read_text())["volumes"]


def docker_daemon() -> str | None:
    """Why no Docker daemon can run the stack here (None: one answers)."""
    docker = shutil.which("docker")
    if docker is None:
        return "no docker client installed"
    info = subprocess.run([docker, "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True,
                          timeout=30, check=False)
    if info.returncode == 0:
        return None
    return f"no Docker daemon answers: {(info.stderr.strip().splitlines() or ['docker info failed'])[-1]}"


@pytest.mark.integration
def test_compose_up_runs_the_example(tmp_path: Path) -> None:
    compose, reason = compose_cli(), docker_daemon()
    if compose is None or reason is not None:
        pytest.skip(reason or "neither the docker compose plugin nor docker-compose is installed")
    project = [*compose, "-f", str(COMPOSE), "-p", f"dspex-test-{os.getpid()}"]
    env = compose_env(DSPEX_FLOWER_BASIC_AUTH="ops:s3cret", DSPEX_REDIS_PORT=str(free_port()),
                      DSPEX_FLOWER_PORT=str(free_port()))
    try:
        up = subprocess.run([*project, "up", "-d", "--build"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=900, check=False)
        assert up.returncode == 0, up.stderr[-3000:]
        run = subprocess.run([*project, "exec", "-T", "worker-default", "dspex-celery", "run",
                              "examples/rag.yaml", "-i", "question=What is a Celery chord?", "--json"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
        assert run.returncode == 0, run.stderr[-3000:]
        assert json.loads(run.stdout)["status"] == "succeeded"
    finally:
        subprocess.run([*project, "down", "-v", "--timeout", "20"], cwd=ROOT, env=env, capture_output=True,
                       timeout=300, check=False)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
