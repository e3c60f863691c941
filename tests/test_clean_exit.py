"""Processes end quietly: no traceback, ``Exception ignored`` or ``sys.meta_path is None`` at exit
(the CLI in-process and against workers, with --json and Ctrl-C, a worker on SIGTERM, a script)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import CLI, ROOT, Cluster, wait_for

pytestmark = pytest.mark.integration

NOISE = re.compile(r"Traceback|Exception ignored|sys\.meta_path is None|Error in atexit|^(ERROR|CRITICAL) ",
                   re.MULTILINE)
SCRIPT = """
import sys
from dspex_celery import Program, submit_program
handle = submit_program(Program.from_file(sys.argv[1]), {})
if sys.argv[2] == "wait":
    print(handle.get(timeout=60).status.value)
"""


def write_programs(tmp: Path) -> dict[str, str]:
    programs = {
        "ok": {"a": {"uses": "tests.modules.basic:add", "inputs": {"a": 1, "b": 2}},
               "b": {"uses": "tests.modules.basic:add", "inputs": {"a": "$a.sum", "b": 1}},
               "c": {"uses": "tests.modules.basic:add", "inputs": {"a": "$a.sum", "b": 2}}},
        "fails": {"a": {"uses": "tests.modules.basic:add", "inputs": {"a": 1, "b": 2}},
                  "b": {"uses": "tests.modules.basic:fail", "depends_on": ["a"]}},
        "slow": {"a": {"uses": "tests.modules.basic:sleep_marked",
                       "inputs": {"seconds": 3, "marker": str(tmp / "slow-started")}},
                 "b": {"uses": "tests.modules.basic:add", "inputs": {"a": 1, "b": 1}, "depends_on": ["a"]}},
    }
    paths = {}
    for name, modules in programs.items():
        path = tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"name": name, "modules": modules}))
        paths[name] = str(path)
    (tmp / "script.py").write_text(SCRIPT)
    paths["script"] = str(tmp / "script.py")
    return paths


def embedded_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSPEX_") or k == "DSPEX_HISTORY_URL"}
    return {**env, "PYTHONPATH": str(ROOT)}


def assert_quiet(args: list[str], env: dict[str, str], codes: tuple[int, ...]) -> None:
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode in codes, f"{args}: exit {done.returncode}\n{done.stderr}"
    assert not NOISE.search(done.stderr), f"{args}:\n{done.stderr}"


def assert_quiet_interrupt(args: list[str], env: dict[str, str], started: Path) -> None:
    """Ctrl-C while a run's module runs (``started`` exists): ``cancelled execution ID``, exit 130,
    and nothing else on stderr."""
    started.unlink(missing_ok=True)
    process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(started.exists, 60, f"{started} (the slow module started)")
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert [line.split()[:2] for line in stderr.splitlines()] == [["cancelled", "execution"]], stderr


def cli_runs(paths: dict[str, str]) -> list[tuple[list[str], tuple[int, ...]]]:
    return [
        ([CLI, "run", paths["ok"], "--json"], (0,)),
        ([CLI, "run", paths["ok"]], (0,)),
        ([CLI, "run", paths["fails"], "--json"], (1,)),
        ([CLI, "run", paths["slow"], "--timeout", "1"], (1,)),
        ([sys.executable, paths["script"], paths["ok"], "wait"], (0,)),
        ([sys.executable, paths["script"], paths["slow"], "no-wait"], (0,)),
    ]


def test_in_process_runs_exit_quietly(tmp_path: Path) -> None:
    paths = write_programs(tmp_path)
    env = embedded_env()
    for args, codes in cli_runs(paths):
        assert_quiet(args, env, codes)
    # Ctrl-C while a module runs: the embedded worker is stopped before Python shuts its thread pools
    # down (it used to take one more message and fail it, ~1 run in 2); repeated for that reason
    for _ in range(4):
        assert_quiet_interrupt([CLI, "run", paths["slow"], "--json"], env, tmp_path / "slow-started")


def test_runs_against_workers_and_the_worker_exit_quietly(make_cluster, tmp_path: Path) -> None:
    # Given a real worker
    cluster: Cluster = make_cluster()
    worker = cluster.start_worker(concurrency=2, pool="threads")
    paths = write_programs(tmp_path)
    env = cluster.env()
    # Then the CLI and a script using submit_program end quietly, Ctrl-C included
    for args, codes in [*cli_runs(paths), ([CLI, "run", paths["slow"], "--detach"], (0,))]:
        assert_quiet(args, env, codes)
    for extra in ([], ["--json"]):
        assert_quiet_interrupt([CLI, "run", paths["slow"], *extra], env, tmp_path / "slow-started")
    # And so does the worker on SIGTERM, with a module still running
    assert_quiet([CLI, "run", paths["slow"], "--detach"], env, (0,))
    time.sleep(1)
    worker.stop()
    assert worker.process.returncode == 0
    text = worker.log.read_text(errors="replace")
    shutdown = text[text.index("Warm shutdown"):]
    assert not NOISE.search(shutdown), shutdown
    assert "Exception ignored" not in text and "sys.meta_path is None" not in text, text[-3000:]


@pytest.mark.parametrize("batch", [False, True], ids=["run", "batch"])
def test_ctrl_c_of_an_in_process_run_leaves_at_once_without_waiting_for_the_running_call(
        tmp_path: Path, batch: bool) -> None:
    # Given an embedded run (or batch) whose module sleeps 30 s, interrupted once the module runs
    started = tmp_path / "started"
    program = tmp_path / "long.yaml"
    program.write_text(yaml.safe_dump({"name": "long", "modules": {"a": {
        "uses": "tests.modules.basic:sleep_marked", "inputs": {"seconds": 30, "marker": str(started)}}}}))
    lines = tmp_path / "lines.jsonl"
    lines.write_text("{}\n")
    args = [CLI, "run", str(program), *(["--inputs-file", str(lines)] if batch else [])]
    env = {**embedded_env(), "XDG_DATA_HOME": str(tmp_path / "data")}
    process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(started.exists, 60, f"{started} (the module started)")
    interrupted = time.monotonic()
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    # Then it cancelled, exited 130 within seconds (not after the call's 30 s) and quietly
    assert process.returncode == 130, stderr
    assert time.monotonic() - interrupted < 10, stderr
    assert "cancelled" in stderr and not NOISE.search(stderr), stderr
    # And the history has the execution as cancelled (its last writes were made before leaving)
    history = subprocess.run([CLI, "history", "--json"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert '"cancelled"' in history.stdout, history.stdout + history.stderr
