"""Embedded runs (no broker) record their history in-process."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest

from dspex_celery import ExecutionStatus, Settings, create_runtime, submit_program
from dspex_celery.history.store import HistoryStore, data_dir, history_url
from tests.conftest import CLI, ROOT, program, wait_for

MODS = "tests.modules.history_mods"


def embedded_env(url: str) -> dict[str, str]:
    import os

    env = {key: value for key, value in os.environ.items() if not key.startswith("DSPEX_")}
    return {**env, "DSPEX_HISTORY_URL": url, "PYTHONPATH": str(ROOT)}


def test_cli_run_in_process_is_in_history_when_the_process_has_exited(tmp_path: Path) -> None:
    # Given an in-process `run` that exits as soon as it printed its result
    url = f"sqlite:///{tmp_path / 'history.db'}"
    path = tmp_path / "prog.json"
    path.write_text(json.dumps({"name": "local", "modules": {
        "a": {"uses": f"{MODS}:nap", "inputs": {"seconds": 0.01}},
        "b": {"uses": "tests.modules.basic:fail", "depends_on": ["a"]},
        "c": {"uses": f"{MODS}:nap", "depends_on": ["b"]},
    }, "failure_tolerance": "tolerant"}))
    ran = subprocess.run([CLI, "run", str(path), "--json"], cwd=ROOT, env=embedded_env(url), capture_output=True,
                         text=True, timeout=120, check=False)
    result = json.loads(ran.stdout)
    assert result["modules"]["c"]["status"] == "skipped"
    # Then another process finds it in history: `show --json` prints the same object
    shown = subprocess.run([CLI, "show", result["execution_id"], "--json"], cwd=ROOT, env=embedded_env(url),
                           capture_output=True, text=True, timeout=60, check=False)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == result
    rows = HistoryStore(url).attempts([result["execution_id"]])
    assert [(row.module, row.attempt, row.status, row.error_type) for row in rows] == [
        ("a", 1, "succeeded", None), ("b", 1, "failed", "ValueError"), ("c", 0, "skipped", None)]


def test_embedded_retries_are_recorded_in_process(redis_url: str, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'history.db'}"
    runtime = create_runtime(Settings(namespace=f"emb{uuid.uuid4().hex[:8]}", history_url=url))
    prog = program("local-flaky", {"flaky": {
        "uses": f"{MODS}:flaky", "retry": {"backoff_s": 0.01},
        "inputs": {"counter": f"history-test:{uuid.uuid4().hex}", "redis_url": redis_url, "failures": 1},
    }})
    result = submit_program(prog, {}, app=runtime.app).get(timeout=60)
    assert result.status is ExecutionStatus.SUCCEEDED
    history = HistoryStore(url)
    wait_for(lambda: history.final_ids([result.execution_id]), 10, "embedded history not written")
    assert [(row.attempt, row.status) for row in history.attempts([result.execution_id])] == [
        (1, "retrying"), (2, "succeeded")]
    assert history.result(result.execution_id).to_json_dict() == result.to_json_dict()


def test_history_url_defaults_to_the_user_data_dir_and_can_be_turned_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    monkeypatch.delenv("DSPEX_HISTORY_URL", raising=False)
    assert data_dir() == tmp_path / "dspex-celery"
    assert history_url(Settings()) == f"sqlite:///{tmp_path / 'dspex-celery' / 'history.db'}"
    assert history_url(Settings(history_url="off")) is None
    # With history off an embedded run writes nothing
    runtime = create_runtime(Settings(namespace=f"emb{uuid.uuid4().hex[:8]}", history_url="off"))
    submit_program(program("quiet", {"a": {"uses": f"{MODS}:nap"}}), {}, app=runtime.app).get(timeout=60)
    assert not (tmp_path / "dspex-celery").exists()
