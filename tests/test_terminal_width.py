"""`history`, `status`, `resources` and `breakers` fit an 80-column terminal: the rightmost columns
give way (cut with … or left out), ids are never cut."""

from __future__ import annotations

import io
import uuid

from rich.console import Console, RenderableType

from dspex_celery.cli.history import history_table, status_lines
from dspex_celery.cli.monitor import resource_tables
from dspex_celery.cli.ops import breaker_table

WIDTH = 80
EXECUTIONS = [uuid.uuid4().hex for _ in range(3)]
WORKER = "dspex-default+io+llm-4242@worker-node-7.eu-west-1.compute.internal"


def rendered(*renderables: RenderableType, width: int = WIDTH) -> list[str]:
    """The lines a terminal of ``width`` columns shows."""
    console = Console(width=width, file=io.StringIO(), color_system=None, highlight=False)
    for renderable in renderables:
        console.print(renderable)
    assert isinstance(console.file, io.StringIO)
    return console.file.getvalue().splitlines()


def assert_fits(lines: list[str], *ids: str) -> None:
    too_wide = [line for line in lines if len(line) > WIDTH]
    assert not too_wide, "\n".join(too_wide)
    text = "\n".join(lines)
    for whole in ids:
        assert whole in text, f"{whole} cut in:\n{text}"


def history_rows() -> list[list[str]]:
    return [[execution, "question_answering_pipeline", "failed", "2026-12-01 12:00:00", "123.456", "48213",
             "$0.0421", "retrieve_passages, generate_answer"] for execution in EXECUTIONS]


def test_history_fits_80_columns_with_whole_ids() -> None:
    lines = rendered(history_table(history_rows(), WIDTH))
    assert_fits(lines, *EXECUTIONS)
    # The left columns stay readable; the right ones gave way
    header = lines[0].split()
    assert header[:4] == ["execution", "program", "status", "submitted"], header
    assert "failed" not in header
    assert "question_answering_pipeline" in lines[1] and " failed " in lines[1]


def test_history_keeps_every_column_when_there_is_room() -> None:
    lines = rendered(history_table(history_rows(), 200), width=200)
    assert lines[0].split() == ["execution", "program", "status", "submitted", "seconds", "tokens", "cost", "failed"]
    assert "retrieve_passages, generate_answer" in lines[1]


def test_status_fits_80_columns_with_whole_ids() -> None:
    data = {
        "live": [{"execution_id": execution, "program": "question_answering_pipeline", "age_s": 12.3,
                  "modules": {"pending": 12, "running": 4, "succeeded": 30, "retrying": 1}} for execution in EXECUTIONS],
        "queues": {"default": 3, "llm_with_a_rather_long_resource_class_name": 120},
        "workers": {WORKER: ["default", "io", "llm"], f"{WORKER}2": ["llm"]},
    }
    lines = rendered(*status_lines(data, WIDTH))
    assert_fits(lines, *EXECUTIONS, WORKER, f"{WORKER}2", "llm_with_a_rather_long_resource_class_name")
    assert any(line.startswith("3 live execution(s)") for line in lines)


def test_resources_fit_80_columns_with_whole_holders() -> None:
    classes = [{
        "resource": "llm", "max_concurrent": 8, "rate": "600/m", "in_use": 2, "utilization": 0.25,
        "holders": [{"execution_id": execution, "module": "generate_answer_with_context", "worker": WORKER,
                     "expires_in_s": 28.5} for execution in EXECUTIONS[:2]],
    }]
    lines = rendered(*resource_tables(classes, WIDTH))
    assert_fits(lines, *(f"{execution}.generate_answer_with_context" for execution in EXECUTIONS[:2]))
    assert lines[0].split() == ["resource", "max", "rate", "in", "use", "utilization"]


def test_breakers_fit_80_columns_with_whole_names() -> None:
    names = [f"question_answering_pipeline.module_number_{index}_with_a_long_name" for index in range(3)]
    found = [{"name": name, "state": "half-open", "failures": 5, "threshold": 5, "retry_in_s": 12.5} for name in names]
    lines = rendered(breaker_table(found, WIDTH))
    assert_fits(lines, *names)
    assert lines[0].split()[:2] == ["circuit", "state"]
