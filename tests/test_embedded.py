"""The embedded default: no server, the same planner and canvas in-process.

Tests taking ``runtime`` run embedded and against a real Redis worker: both must behave alike.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dspex_celery import ExecutionStatus, ModuleStatus, Program, Runtime, Settings, create_runtime, submit_program
from dspex_celery.examples import synthetic
from tests.conftest import dspex, program

QUESTION = "What is a Celery chord?"


@pytest.fixture(scope="module")
def embedded_app():
    return create_runtime(Settings(namespace="embedded-tests")).app


def test_run_example_json_shape() -> None:
    # When the README's first command runs
    started = time.monotonic()
    result = dspex("run", "examples/rag.yaml", "-i", f"question={QUESTION}", "--json")
    elapsed = time.monotonic() - started
    # Then stdout is exactly one JSON object with the documented keys
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert {"execution_id", "program", "strategy", "status", "outputs", "modules"} <= set(data)
    assert data["status"] == "succeeded" and data["program"] == "rag" and data["strategy"] == "levels"
    assert data["outputs"]["answer"].startswith("A Celery chord runs a group of tasks")
    assert data["outputs"]["sources"][0] == "chord"
    for record in data["modules"].values():
        assert {"status", "attempts", "started_at", "finished_at", "duration_s", "worker", "error"} <= set(record)
        assert record["status"] == "succeeded" and record["attempts"] == 1 and record["worker"]
    assert elapsed < 10  # a loose bound on the whole process; the engine itself is measured in scripts/


def test_run_human_output() -> None:
    result = dspex("run", "examples/rag.yaml", "-i", f"question={QUESTION}")
    assert result.returncode == 0
    assert "succeeded" in result.stdout and "answer:" in result.stdout and "retrieve" in result.stdout


def test_value_parsing_json_or_string(tmp_path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        "name: p\ninputs: [a, b, s]\nmodules:\n  e: {uses: 'tests.modules.basic:echo', "
        "inputs: {a: $inputs.a, b: $inputs.b, s: $inputs.s, lit: '$$inputs.a'}}\n"
    )
    result = dspex("run", str(path), "-i", "a=3", "-i", 'b={"k": [1]}', "-i", "s=hello world", "--json")
    outputs = json.loads(result.stdout)["outputs"]["e"]
    assert outputs == {"a": 3, "b": {"k": [1]}, "s": "hello world", "lit": "$inputs.a"}


def test_plan_json() -> None:
    result = dspex("plan", "examples/rag.yaml", "--json")
    data = json.loads(result.stdout)
    assert data["levels"] == [["retrieve"], ["generate"]]
    assert data["critical_path"] == ["retrieve", "generate"] and data["width"] == 1


def test_module_kinds(runtime: Runtime) -> None:
    # Given a class module with `with:`, a pydantic output, and omitted inputs (seed semantics)
    prog = program(
        "kinds",
        {
            "scale": {"uses": "tests.modules.basic:Scaler", "with": {"factor": 3}, "inputs": {"x": "$inputs.x"}},
            "model": {"uses": "tests.modules.basic:as_model", "inputs": {"question": "$inputs.q"}},
            "merged": {"uses": "tests.modules.basic:echo", "depends_on": ["scale", "model"]},
        },
        inputs=["x", "q"],
    )
    result = submit_program(prog, {"x": 2, "q": "hi"}, app=runtime.app).get(timeout=30)
    assert result.status is ExecutionStatus.SUCCEEDED
    merged = result.outputs["merged"]
    assert merged["y"] == 6 and merged["text"] == "HI" and merged["score"] == 1.0
    assert merged["x"] == 2 and merged["q"] == "hi"  # program inputs merged first


def test_missing_output_field_is_clear(runtime: Runtime) -> None:
    prog = program(
        "field",
        {
            "a": {"uses": "tests.modules.basic:add", "inputs": {"a": 1, "b": 2}},
            "b": {"uses": "tests.modules.basic:echo", "inputs": {"v": "$a.total"}},
        },
    )
    result = submit_program(prog, {}, app=runtime.app).get(timeout=30, propagate=False)
    assert result.status is ExecutionStatus.FAILED
    assert result.modules["b"].status is ModuleStatus.FAILED
    assert "refers to $a.total, but 'a' returned no field 'total' (fields: sum)" in result.modules["b"].error


def test_not_a_mapping(runtime: Runtime) -> None:
    prog = program("nm", {"a": {"uses": "tests.modules.basic:not_mapping"}})
    result = submit_program(prog, {}, app=runtime.app).get(timeout=30, propagate=False)
    assert "returned list; return a mapping" in result.modules["a"].error


@pytest.mark.parametrize("strategy", ["levels", "sequential"])
def test_synthetic_outputs_embedded(embedded_app, strategy: str) -> None:
    data = synthetic.random_dag(40, seed=7)
    result = submit_program(Program.from_dict(data), {}, app=embedded_app, strategy=strategy).get(timeout=60)
    expected = synthetic.expected_values(data)
    sinks = {name: {"value": value} for name, value in expected.items() if name in result.outputs}
    assert result.outputs == sinks and result.status is ExecutionStatus.SUCCEEDED


def test_python_api_from_file(embedded_app) -> None:
    handle = submit_program("examples/rag.yaml", {"question": QUESTION}, app=embedded_app)
    result = handle.get(timeout=30)
    assert handle.status() is ExecutionStatus.SUCCEEDED
    assert result.outputs["sources"] == ["chord", "celery"]


def test_successful_run_is_quiet_on_stderr() -> None:
    run = dspex("run", "examples/rag.yaml", "-i", f"question={QUESTION}", "--json")
    assert run.stderr == ""


def test_embedded_worker_leaves_result_get_usable(embedded_app) -> None:
    # A caller that used the embedded worker can still block on its own Celery results
    from celery._state import task_join_will_block

    submit_program("examples/rag.yaml", {"question": QUESTION}, app=embedded_app).get(timeout=30)
    assert task_join_will_block() is False


def imported_by_a_run(watched: set[str], env: dict[str, str]) -> str:
    """The README's first command, in-process: which of the ``watched`` modules it imported ('-': none)."""
    script = (
        "import sys\n"
        "from dspex_celery.cli import main\n"
        f"sys.argv = ['dspex-celery', 'run', 'examples/rag.yaml', '-i', 'question={QUESTION}']\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as exc:\n"
        "    print('exit', exc.code)\n"
        f"print(' '.join(sorted(set(sys.modules) & {watched!r})) or '-')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent.parent, env={**os.environ, **env})
    *_, status, imported = done.stdout.strip().splitlines()
    assert status == "exit 0", done.stderr
    return imported


def test_embedded_run_without_history_imports_neither_sqlalchemy_nor_networkx() -> None:
    # Given the README's first command with history off (the optimizer and the history store need them)
    imported = imported_by_a_run({"sqlalchemy", "networkx"}, {"DSPEX_HISTORY_URL": "off"})
    # Then it succeeds having imported neither
    assert imported == "-", f"imported by an embedded run: {imported}"


def test_embedded_run_with_history_imports_neither_the_orm_nor_alembic(tmp_path: Path) -> None:
    # Given a history database made by an earlier run (the first run creates its tables with Alembic)
    env = {"DSPEX_HISTORY_URL": f"sqlite:///{tmp_path / 'history.sqlite'}"}
    imported_by_a_run(set(), env)
    # When the README's first command runs again, history on
    imported = imported_by_a_run({"sqlalchemy", "sqlalchemy.orm", "alembic"}, env)
    # Then it wrote its history with SQLAlchemy Core alone (the ORM and Alembic cost ~0.1 s each to import)
    assert imported == "sqlalchemy", f"imported by an embedded run: {imported}"


def test_embedded_runs_leave_only_the_history_database_behind(tmp_path: Path) -> None:
    # Given two embedded runs of the README's first command, history in a folder of its own
    folder = tmp_path / "history"
    env = {"DSPEX_HISTORY_URL": f"sqlite:///{folder / 'history.sqlite'}"}
    for _ in range(2):
        done = dspex("run", "examples/rag.yaml", "-i", f"question={QUESTION}", env=env)
        assert done.returncode == 0, done.stderr
    # Then both are in the history, and the folder holds the database alone (no SQLite WAL or shared
    # memory file: every connection was closed before the process exited)
    listed = dspex("history", "--json", env=env)
    assert [row["status"] for row in json.loads(listed.stdout)] == ["succeeded", "succeeded"]
    assert sorted(path.name for path in folder.iterdir()) == ["history.sqlite"]
