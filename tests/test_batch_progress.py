"""A batch on a terminal shows done/failed/in flight, lines/s, the ETA and the running mean of --metric."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import CLI, ROOT, Cluster

pytestmark = pytest.mark.integration

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def test_batch_progress_on_a_terminal_shows_eta_and_running_metric(make_cluster, tmp_path: Path) -> None:
    cluster: Cluster = make_cluster()
    cluster.start_worker("default", concurrency=2, pool="threads")
    # Given a batch of 4 lines whose metric scores 1, 1, 0, 1
    program = tmp_path / "echo.yaml"
    program.write_text(yaml.safe_dump({"name": "echo", "inputs": ["question"], "modules": {
        "one": {"uses": "tests.modules.basic:echo", "inputs": {"text": "$inputs.question"}}},
        "outputs": {"answer": "$one.text"}}))
    inputs = tmp_path / "data.jsonl"
    inputs.write_text("".join(json.dumps({"question": f"q{index}", "expected": score}) + "\n"
                              for index, score in enumerate([1, 1, 0, 1])))
    env = cluster.env(COLUMNS="100")
    args = [CLI, "run", str(program), "--inputs-file", str(inputs), "--metric", "tests.modules.progress_mods:expected"]
    # When it runs with stderr on a terminal (a pty)
    leader, follower = pty.openpty()
    done = subprocess.run(args, check=False, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=follower, timeout=90)
    os.close(follower)
    shown = ANSI.sub("", os.read(leader, 65536).decode(errors="replace"))
    os.close(leader)
    # Then the progress line counts the lines, their rate, the ETA and the mean metric so far
    assert done.returncode == 0, shown
    final = re.findall(r"batch 4/4 · 0 failed · 0 in flight · [0-9.]+ lines/s · ETA [-:0-9]+ · metric ([0-9.]+)%", shown)
    assert final and final[-1] == "75.0", shown
    # And stdout is the same summary as without a terminal
    assert b"Average Metric: 3.00 / 4 (75.0%)" in done.stdout and b"batch 4/4" not in done.stdout
