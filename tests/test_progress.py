"""Live progress of `run`: shown on a terminal (pty), never when piped, with --json or --quiet."""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import struct
import subprocess
import termios
import time
from pathlib import Path

import pytest
from rich.console import Console

from dspex_celery.cli.progress import ProgressView, eta_seconds
from dspex_celery.results import ModuleRecord, ModuleStatus, isoformat, utcnow
from tests.conftest import CLI, ROOT, program

# Three parallel modules with room for one at a time: waiting, running and done all show up.
LIMITED = {"DSPEX_RESOURCES": json.dumps({"default": {"max_concurrent": 1}})}
ESC = "\x1b["


def write_program(tmp_path: Path, seconds: float) -> str:
    modules = {f"step{i}": {"uses": "tests.modules.ops_mods:hold", "inputs": {"seconds": seconds}} for i in range(3)}
    path = tmp_path / f"progress-{seconds}.json"
    path.write_text(json.dumps({"name": "progress", "inputs": [], "modules": modules}))
    return str(path)


def embedded_env(**extra: str) -> dict[str, str]:
    """An in-process run (no broker): needs no service. History stays in the tests' file."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("DSPEX_") or key == "DSPEX_HISTORY_URL"}
    return {**env, "PYTHONPATH": str(ROOT), "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40", **extra}


def start_in_pty(args: list[str], env: dict[str, str]) -> tuple[subprocess.Popen[bytes], int]:
    """Start with a 120x40 pseudo-terminal as stdin/stdout/stderr; the process and the pty's master."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    process = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, env=env, close_fds=True)
    os.close(slave)
    return process, master


def run_in_pty(args: list[str], env: dict[str, str], timeout: float = 60) -> tuple[int, str]:
    """Run in a pseudo-terminal; everything it wrote, decoded."""
    return collect(*start_in_pty(args, env), timeout=timeout)


def collect(process: subprocess.Popen[bytes], master: int, timeout: float = 60) -> tuple[int, str]:
    """Read the pty until the process closes it; its exit code and output."""
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if not ready:
                if process.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
        if process.poll() is None:
            process.kill()
    return process.wait(timeout=10), b"".join(chunks).decode(errors="replace")


def test_progress_display_on_a_terminal(tmp_path: Path) -> None:
    code, output = run_in_pty([CLI, "run", write_program(tmp_path, 0.6)], embedded_env(**LIMITED))
    assert code == 0, output
    # The live display: counts, elapsed time, per-module states (waiting for the one slot, too)
    assert re.search(r"[0-2]/3 finished +\S*(\d pending|\d waiting)", output), output
    for text in ("finished", "elapsed", "waiting", "running", "step0", "step2"):
        assert text in output, f"{text!r} not shown:\n{output}"
    assert ESC in output  # drawn in place with terminal control sequences
    # And the final summary follows it
    assert "progress" in output and "succeeded" in output


def test_the_display_shows_an_eta_once_history_knows_the_program(tmp_path: Path) -> None:
    # Given a program run once before, with history in a file of its own
    env = embedded_env(DSPEX_HISTORY_URL=f"sqlite:///{tmp_path / 'history.sqlite'}")
    path = write_program(tmp_path, 1.0)  # long enough for the display to redraw with an ETA on a loaded machine
    first, before = run_in_pty([CLI, "run", path], env)
    # When it runs again on a terminal
    second, output = run_in_pty([CLI, "run", path], env)
    # Then the live display estimates the time left from the first run's durations (the first had none)
    assert (first, second) == (0, 0), output
    assert "ETA" not in before and re.search(r"elapsed [0-9.]+s  ETA ~\d+s", output), output


def test_no_display_with_quiet_json_or_a_pipe(tmp_path: Path) -> None:
    # Three runs at once (each is mostly interpreter start-up): --quiet and --json on a terminal, and piped
    command = [CLI, "run", write_program(tmp_path, 0.1)]
    quiet, as_json = (start_in_pty([*command, flag], embedded_env()) for flag in ("--quiet", "--json"))
    piped = subprocess.run(command, cwd=ROOT, env=embedded_env(), capture_output=True, text=True, timeout=60, check=False)
    for code, output in (collect(*quiet), collect(*as_json)):
        assert code == 0, output
        assert "elapsed" not in output and "pending" not in output
    assert json.loads(output)["status"] == "succeeded"  # --json: exactly one JSON document
    assert piped.returncode == 0, piped.stderr
    assert "elapsed" not in piped.stdout and ESC not in piped.stdout
    assert "succeeded" in piped.stdout and piped.stderr == ""


# --- ETA ----------------------------------------------------------------------------------------

DIAMOND = {
    "a": {"uses": "tests.modules.basic:add", "inputs": {"a": 1, "b": 1}},
    "b": {"uses": "tests.modules.basic:add", "inputs": {"a": "$a.sum", "b": 1}},
    "c": {"uses": "tests.modules.basic:add", "inputs": {"a": "$a.sum", "b": 2}},
    "d": {"uses": "tests.modules.basic:add", "inputs": {"a": "$b.sum", "b": "$c.sum"}},
}
DURATIONS = {"a": 1.0, "b": 2.0, "c": 5.0, "d": 1.0}


def diamond_records() -> dict[str, ModuleRecord]:
    """`a` done, `b` running for about 1 s, `c` and `d` not started."""
    started = utcnow().timestamp() - 1.0
    from datetime import UTC, datetime

    return {
        "a": ModuleRecord(status=ModuleStatus.SUCCEEDED, attempts=1, duration_s=1.0),
        "b": ModuleRecord(status=ModuleStatus.RUNNING, attempts=1,
                          started_at=isoformat(datetime.fromtimestamp(started, UTC))),
    }


def test_eta_follows_the_longest_remaining_chain() -> None:
    plan = program("diamond", DIAMOND).plan()
    # c (5 s, not started) then d (1 s): 6 s; b has 1 s left, so it is not on the longest chain
    assert eta_seconds(plan, diamond_records(), DURATIONS, utcnow()) == pytest.approx(6.0, abs=0.05)
    # Once c is done only b's remaining second and d's second are left
    records = {**diamond_records(), "c": ModuleRecord(status=ModuleStatus.SUCCEEDED)}
    assert eta_seconds(plan, records, DURATIONS, utcnow()) == pytest.approx(2.0, abs=0.05)


class FakeHandle:
    execution_id = "e1"

    def records(self) -> dict[str, ModuleRecord]:
        return diamond_records()


def rendered(durations: dict[str, float] | None) -> str:
    plan = program("diamond", DIAMOND).plan()
    console = Console(record=True, width=120, height=30, force_terminal=False)
    console.print(ProgressView(FakeHandle(), plan, durations, console).render())  # type: ignore[arg-type]
    return console.export_text()


def test_view_shows_states_counts_and_eta_only_with_durations() -> None:
    text = rendered(DURATIONS)
    assert "1/4 finished" in text and "1 running" in text and "2 pending" in text and "1 done" in text
    assert "ETA ~6s" in text
    assert text.index("b ") < text.index("c ")  # running modules are listed before pending ones
    assert "ETA" not in rendered(None)
