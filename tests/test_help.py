"""Every command's --help renders, and says what the code does."""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

from dspex_celery.cli import COMMANDS as LAZY_COMMANDS
from dspex_celery.cli import cli

CLI = str(Path(sys.executable).with_name("dspex-celery"))
ROOT = Path(__file__).resolve().parent.parent
#: Imports that `dspex-celery --help` must not pay for (each is only where a command uses it).
HEAVY = ("celery", "kombu", "sqlalchemy", "redis", "pydantic", "rich", "jinja2", "networkx", "yaml")


def command_paths(group: click.Group = cli, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """The argv of every command and sub-command of the click tree (lazy commands too)."""
    context = click.Context(group)
    for name in group.list_commands(context):
        command = group.get_command(context, name)
        yield (*prefix, name)
        if isinstance(command, click.Group):
            yield from command_paths(command, (*prefix, name))


COMMANDS = list(command_paths())


def help_text(*path: str) -> str:
    """``--help`` of a command, whitespace collapsed (click wraps lines)."""
    result = CliRunner().invoke(cli, [*path, "--help"], prog_name="dspex-celery")
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Usage: dspex-celery {' '.join(path)}".rstrip()), result.output
    return " ".join(result.output.split())


def option_help(text: str, option: str, next_option: str) -> str:
    """The help of ``option`` in a collapsed help text (up to the next option)."""
    return text.split(f" {option} ", 1)[1].split(f" {next_option}", 1)[0]


def test_walk_finds_the_sub_commands() -> None:
    assert ("breakers", "reset") in COMMANDS and ("run",) in COMMANDS and len(COMMANDS) >= 16


@pytest.mark.parametrize("path", [(), *COMMANDS], ids=lambda path: " ".join(path) or "dspex-celery")
def test_help_renders(path: tuple[str, ...]) -> None:
    text = help_text(*path)
    assert "Options:" in text and "-h, --help" in text


def test_strategy_default_is_chosen_per_program(tmp_path: Path) -> None:
    # The help says the default depends on the program ...
    for command in ("run", "plan"):
        strategy = option_help(help_text(command), "--strategy [levels|sequential|dag]", "--")
        assert "default: chosen per program" in strategy and "else dag" in strategy, strategy
        assert "default: levels)" not in strategy
    # ... and so it does: balanced levels run as levels, unbalanced ones as dag
    balanced = {"a": {"uses": "tests.modules.basic:add", "inputs": {"a": 1, "b": 1}},
                "b": {"uses": "tests.modules.basic:add", "inputs": {"a": "$a.sum", "b": 1}}}
    unbalanced = {**balanced, "c": {"uses": "tests.modules.basic:add", "inputs": {"a": 1, "b": 1}},
                  "d": {"uses": "tests.modules.basic:add", "inputs": {"a": "$c.sum", "b": 1}, "depends_on": ["a"]}}
    chosen = {}
    for name, modules in (("balanced", balanced), ("unbalanced", unbalanced)):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"name": name, "modules": modules}))
        result = CliRunner().invoke(cli, ["plan", str(path), "--json"])
        assert result.exit_code == 0, result.output
        chosen[name] = json.loads(result.stdout)["strategy"]
    assert chosen == {"balanced": "levels", "unbalanced": "dag"}


@pytest.mark.parametrize("path", [path for path in COMMANDS if "--broker" in help_text(*path)],
                         ids=" ".join)
def test_broker_help_promises_in_process_only_for_run(path: tuple[str, ...]) -> None:
    broker = option_help(help_text(*path), "--broker URL", "--result-backend")
    assert "DSPEX_BROKER_URL" in broker
    assert ("none: run in-process" in broker) == (path == ("run",)), broker


def test_worker_help_and_the_worker_need_a_broker() -> None:
    broker = option_help(help_text("worker"), "--broker URL", "--result-backend")
    assert "in-process" not in broker
    result = CliRunner().invoke(cli, ["worker"], env={"DSPEX_BROKER_URL": "", "DSPEX_CONFIG": "/nonexistent"})
    assert result.exit_code == 2 and "a worker needs a broker" in result.stderr


def test_show_promises_json_only_with_the_flag() -> None:
    text = help_text("show")
    assert "Show a recorded execution: status, outputs and one row per module" in text
    assert "--json Print the same JSON object as run --json." in text
    assert "(the same JSON as" not in text


def test_resume_strategy_defaults_to_the_original() -> None:
    assert "Execution strategy (default: the original execution's)." in help_text("resume")


def test_result_backend_default_is_named() -> None:
    backend = option_help(help_text("status"), "--result-backend URL", "--json")
    assert "DSPEX_RESULT_BACKEND" in backend and "the broker when it is Redis" in backend


def test_the_group_lists_each_lazy_command_with_its_own_help_line() -> None:
    for name, lazy in LAZY_COMMANDS.items():
        command = cli.get_command(click.Context(cli), name)
        assert command is not None and command.name == name
        assert lazy.short_help == " ".join((command.help or "").partition("\n\n")[0].split()), name
    assert sorted(LAZY_COMMANDS) == sorted(cli.commands)


def test_help_imports_no_engine_library() -> None:
    # `dspex-celery --help` builds the group and lists every command without importing them
    script = (
        "import sys\n"
        "from dspex_celery.cli import main\n"
        "sys.argv = ['dspex-celery', '--help']\n"
        "try:\n"
        "    main()\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print(' '.join(sorted({{name.split('.')[0] for name in sys.modules}} & {set(HEAVY)!r})), file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0 and re.search(r"\n  worker +Start a worker", done.stdout), done.stderr
    assert done.stderr.strip() == "", f"imported by --help: {done.stderr}"


def test_help_is_quick() -> None:
    # `dspex-celery --help` takes 0.04 s on an idle machine (0.7-1.6 s when every command module was
    # imported up front); measured beyond a bare interpreter's start, so a loaded CI box slows both
    def seconds(*argv: str) -> float:
        started = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True, timeout=60)
        return time.perf_counter() - started

    bare = statistics.median(seconds(sys.executable, "-c", "pass") for _ in range(3))
    assert statistics.median(seconds(CLI, "--help") for _ in range(3)) - bare < 0.5
