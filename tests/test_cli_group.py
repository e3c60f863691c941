"""Celery's conventions on the group: `dspex-celery -b URL --result-backend URL --config FILE COMMAND`,
still accepted on the commands (the command's own wins), environment variables as the fallback."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from dspex_celery.cli import cli

#: Nothing listens on these ports: the error line names the URL a command used.
DEAD = {port: f"redis://127.0.0.1:{port}/0" for port in (1, 2, 3, 4)}


@pytest.fixture
def no_dspex_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [key for key in os.environ if key.startswith("DSPEX_")]:
        monkeypatch.delenv(key)


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), env=env)


def used_url(result: Result) -> str:
    """The backend URL a failed cluster command says it could not reach."""
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    return next(url for url in DEAD.values() if url in result.stderr)


@pytest.mark.usefixtures("no_dspex_env")
def test_group_options_reach_the_command_and_the_command_wins(tmp_path: Path) -> None:
    config = tmp_path / "dspex.yaml"
    config.write_text(f"broker_url: {DEAD[3]}\n")
    assert used_url(invoke("-b", DEAD[1], "status")) == DEAD[1]
    assert used_url(invoke("--broker", DEAD[1], "--result-backend", DEAD[2], "status")) == DEAD[2]
    assert used_url(invoke("-b", DEAD[1], "status", "-b", DEAD[2])) == DEAD[2]
    assert used_url(invoke("--config", str(config), "breakers")) == DEAD[3]
    assert used_url(invoke("--config", str(config), "-b", DEAD[1], "resources")) == DEAD[1]
    # the environment stays the fallback, and the group's flags go over it
    assert used_url(invoke("status", env={"DSPEX_BROKER_URL": DEAD[4]})) == DEAD[4]
    assert used_url(invoke("-b", DEAD[1], "status", env={"DSPEX_BROKER_URL": DEAD[4]})) == DEAD[1]
    # and nothing is left behind in this process once the command ended
    assert not {"DSPEX_BROKER_URL", "DSPEX_RESULT_BACKEND", "DSPEX_CONFIG"} & set(os.environ)


@pytest.mark.integration
def test_group_broker_runs_a_real_command(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DSPEX_BROKER_URL", raising=False)
    monkeypatch.setenv("DSPEX_NAMESPACE", "cli-group-test")
    result = invoke("-b", redis_url, "status", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["live"] == []


@pytest.mark.usefixtures("no_dspex_env")
def test_a_missing_config_file_is_one_line(tmp_path: Path) -> None:
    result = invoke("--config", str(tmp_path / "nope.yaml"), "status")
    assert result.exit_code == 2 and "nope.yaml" in result.stderr and "does not exist" in result.stderr


def test_group_help_lists_the_connection_options() -> None:
    text = " ".join(invoke("--help").output.split())
    assert "-b, --broker URL" in text and "--result-backend URL" in text and "--config FILE" in text
