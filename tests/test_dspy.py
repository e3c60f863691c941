"""DSPy programs on real workers: dspy.Module classes, DummyLM (dict mode), compiled state, Program API."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import dspy
import pytest

from dspex_celery import ExecutionStatus, Program, Settings, create_runtime
from dspex_celery.errors import DspyMissing, ExecutionFailed, ProgramError, UsageError
from dspex_celery.examples.dspy_rag import OFFLINE_ANSWERS
from tests.conftest import ROOT, Cluster
from tests.modules import dspy_mods
from tests.modules.dspy_mods import COMPILED_ANSWER, rag_program

pytestmark = pytest.mark.integration

REDIS_ANSWER = dspy_mods.ANSWERS["redis"]


@pytest.fixture(scope="module")
def cluster(make_cluster) -> Cluster:
    """A prefork worker for `default` and a threads worker for `llm` (dspy.context is per thread)."""
    cluster = make_cluster()
    cluster.start_worker("default", "io", concurrency=2)
    cluster.start_worker("llm", concurrency=4, pool="threads")
    return cluster


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state JSON saved by DSPy after LabeledFewShot compiled `Generate` (one demo with the marker)."""
    folder = tmp_path_factory.mktemp("compiled")
    return Path(dspy_mods.compiled_state(str(folder / "generate.json")))


def embedded_app():
    return create_runtime(Settings(namespace="dspy-embedded")).app


def test_rag_program_runs_on_workers_with_dummy_lm_answers(cluster: Cluster) -> None:
    # Given a two-module DSPy program (Retrieve -> ChainOfThought) whose LM comes from a factory
    result = cluster.run(Program.from_dict(rag_program(resource="llm")), {"question": "what is redis?"})
    # Then DummyLM's answer comes back as the program output (Prediction.toDict() of each module)
    assert result.status is ExecutionStatus.SUCCEEDED, result.modules
    assert result.outputs == {**REDIS_ANSWER, "query": "what is redis?"}
    # And each module ran on its worker: retrieve on prefork `default`, generate on threads `llm`
    assert result.modules["retrieve"].worker.startswith(cluster.workers[0].name + "@")
    assert result.modules["generate"].worker.startswith(cluster.workers[1].name + "@")
    other = cluster.run(Program.from_dict(rag_program(resource="llm")), {"question": "what is celery?"})
    assert other.outputs["answer"] == dspy_mods.ANSWERS["celery"]["answer"]


def test_compiled_state_is_loaded_on_the_worker(cluster: Cluster, compiled: Path, tmp_path: Path) -> None:
    # Given a program file beside the compiled state, referring to it by a relative path
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "generate.json").write_text(compiled.read_text())
    program_file = tmp_path / "rag.json"
    program_file.write_text(json.dumps(rag_program(state="state/generate.json")))
    # When the CLI runs it from another directory against the cluster
    done = cluster.cli("run", str(program_file), "-i", "question=what is redis?", "--json")
    # Then the loaded demo (with the marker) is in the prompt, so DummyLM gives the compiled answer
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["outputs"]["answer"] == COMPILED_ANSWER
    # While the same program without state gets the plain answer
    plain = cluster.run(Program.from_dict(rag_program()), {"question": "what is redis?"})
    assert plain.outputs["answer"] == REDIS_ANSWER["answer"]


def test_forward_embedded_equals_cluster(cluster: Cluster, compiled: Path) -> None:
    program = Program.from_dict(rag_program(state=str(compiled)))
    remote = cluster.run(program, {"question": "what is redis?"})
    # Program.forward / program(...) run it in-process and return a dspy.Prediction
    prediction = program.using(app=embedded_app())(question="what is redis?")
    assert isinstance(prediction, dspy.Prediction)
    assert prediction.answer == COMPILED_ANSWER
    assert prediction.toDict() == remote.outputs
    plain = Program.from_dict(rag_program()).using(app=embedded_app())
    assert plain.forward(question="what is celery?").answer == dspy_mods.ANSWERS["celery"]["answer"]


def test_program_is_a_dspy_evaluate_target() -> None:
    # dspy.Evaluate calls program(**example.inputs()) from its thread pool and scores Predictions
    program = Program.from_dict(rag_program()).using(app=embedded_app())
    devset = [
        dspy.Example(question="what is redis?", answer=REDIS_ANSWER["answer"]).with_inputs("question"),
        dspy.Example(question="what is celery?", answer="wrong on purpose").with_inputs("question"),
    ]
    result = dspy.Evaluate(devset=devset, metric=dspy_mods.exact_match, num_threads=2)(program)
    assert result.score == 50.0


def test_add_module_with_a_compiled_instance(cluster: Cluster, tmp_path: Path) -> None:
    # Given a dspy.Module instance compiled in this process (not a file)
    compiled_path = dspy_mods.compiled_state(str(tmp_path / "c.json"))
    instance = dspy_mods.Generate()
    instance.load(compiled_path)
    base = rag_program()
    program = Program("from_instance", inputs=["question"], dspy=base["dspy"], outputs=base["outputs"])
    program.add_module("retrieve", "tests.modules.dspy_mods:Retrieve", inputs={"question": "$inputs.question"})
    program.add_module("generate", instance, inputs=base["modules"]["generate"]["inputs"], state_dir=tmp_path / "s")
    # Then it refers to the importable class and to its state saved as JSON
    module = program.plan().modules["generate"]
    assert module.uses == "tests.modules.dspy_mods:Generate"
    assert Path(module.state).parent == (tmp_path / "s").resolve()
    assert json.loads(Path(module.state).read_text())["respond.predict"]["demos"]
    # And workers rebuild it with its demos
    result = cluster.run(program, {"question": "what is redis?"})
    assert result.outputs["answer"] == COMPILED_ANSWER
    # An uncompiled instance needs no state file
    fresh = Program("fresh").add_module("g", dspy_mods.Generate(), inputs={"question": "q", "context": []})
    assert "state" not in fresh.to_dict()["modules"]["g"]


def test_add_module_refuses_what_workers_cannot_rebuild() -> None:
    class Local(dspy.Module):
        def forward(self, question: str) -> dspy.Prediction:
            return dspy.Prediction(answer=question)

    with pytest.raises(UsageError, match="which workers cannot import: move it to an importable module"):
        Program("p").add_module("local", Local())
    with pytest.raises(UsageError, match="workers cannot build RateLimitedOnce"):
        Program("p").add_module("limited", dspy_mods.RateLimitedOnce("redis://x", "k"))
    with pytest.raises(UsageError, match="expected 'package.module:attribute' or a dspy.Module instance"):
        Program("p").add_module("number", 42)


def test_lm_factory_failures_are_clear_and_not_retried(cluster: Cluster) -> None:
    # Given a module whose own dspy.lm factory raises (its key wins over the program's)
    data = rag_program()
    data["modules"]["generate"]["dspy"] = {"lm": "tests.modules.dspy_mods:broken_lm"}
    result = cluster.run(Program.from_dict(data), {"question": "what is redis?"})
    # Then that module fails at once with one line naming the factory, its error and the fix
    record = result.modules["generate"]
    assert result.status is ExecutionStatus.FAILED and record.attempts == 1
    assert result.modules["retrieve"].status.value == "succeeded"
    assert record.error == (
        "LMFactoryError: module 'generate': dspy.lm factory 'tests.modules.dspy_mods:broken_lm' failed "
        "(RuntimeError: no API key configured): fix the factory or its settings (model, API key)"
    )
    data["modules"]["generate"]["dspy"] = {"lm": "tests.modules.dspy_mods:not_an_lm"}
    result = cluster.run(Program.from_dict(data), {"question": "what is redis?"})
    assert "returned int, not a BaseLM" in result.modules["generate"].error


def test_missing_factory_or_state_is_a_program_error(tmp_path: Path) -> None:
    data = rag_program(state="missing/generate.json")
    data["dspy"]["lm"] = "tests.modules.dspy_mods:no_such_factory"
    program_file = tmp_path / "p.json"
    program_file.write_text(json.dumps(data))
    with pytest.raises(ProgramError) as caught:
        Program.from_file(program_file).plan()
    assert caught.value.problems == [
        (f"module 'generate': state file {tmp_path / 'missing/generate.json'} not found "
         "(a relative state path is relative to the program file's folder)"),
        ("dspy.lm 'tests.modules.dspy_mods:no_such_factory' cannot be resolved "
         "('tests.modules.dspy_mods' has no attribute 'no_such_factory')"),
    ]


def test_lm_rate_limit_is_retried(cluster: Cluster, redis_url: str) -> None:
    key = f"{cluster.settings.namespace}:ratelimit"
    data = {
        "name": "limited",
        "inputs": ["question"],
        "modules": {"ask": {"uses": "tests.modules.dspy_mods:RateLimitedOnce", "inputs": {"question": "$inputs.question"},
                            "with": {"counter_url": redis_url, "counter_key": key}, "retry": {"backoff_s": 0}}},
    }
    result = cluster.run(Program.from_dict(data), {"question": "hi"})
    assert result.status is ExecutionStatus.SUCCEEDED
    assert result.outputs == {"ask": {"answer": "ok: hi"}} and result.modules["ask"].attempts == 2


def test_example_runs_on_the_cluster(cluster: Cluster) -> None:
    done = cluster.cli("run", "examples/dspy_rag.yaml", "-i", "question=What is a Celery chord?", "--json")
    assert done.returncode == 0, done.stderr
    outputs = json.loads(done.stdout)["outputs"]
    assert outputs["answer"] == OFFLINE_ANSWERS["Celery chord"] and outputs["sources"] == ["chord", "celery"]


def run_without_dspy(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI in a process where `import dspy` fails, as if the extra were not installed."""
    code = textwrap.dedent("""
        import sys
        sys.modules["dspy"] = None
        from dspex_celery.cli import main
        sys.argv = ["dspex-celery", *sys.argv[1:]]
        main()
    """)
    return subprocess.run([sys.executable, "-c", code, *args], check=False, cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_without_dspy_core_works_and_dspy_programs_say_how_to_install() -> None:
    assert run_without_dspy("run", "examples/rag.yaml", "-i", "question=What is Redis?").returncode == 0
    for command in (["validate"], ["run", "-i", "question=What is Redis?"]):
        done = run_without_dspy(command[0], "examples/dspy_rag.yaml", *command[1:])
        # one line naming the extra (not also one line per dspy.Module that cannot be imported)
        assert done.returncode == 2 and done.stderr.splitlines() == [
            "error: examples/dspy_rag.yaml: dspy is not installed: pip install 'dspex-celery[dspy]'"
        ]


def test_program_needing_dspy_without_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "dspy", None)
    tool = {"uses": "tests.modules.basic:echo", "dspy": {"lm": "tests.modules.dspy_mods:dummy_lm"}}
    with pytest.raises(ProgramError, match=r"the program sets 'dspy' but dspy is not installed: pip install"):
        Program.from_dict({"name": "p", "modules": {"tool": tool}}).plan()
    with pytest.raises(DspyMissing, match=r"add_module\('g', <Generate instance>\) needs dspy"):
        Program("p").add_module("g", dspy_mods.Generate())


def test_failed_forward_raises(tmp_path: Path) -> None:
    data: dict[str, Any] = rag_program()
    data["dspy"]["lm"] = "tests.modules.dspy_mods:broken_lm"  # the program's LM: every dspy.Module fails
    with pytest.raises(ExecutionFailed, match=r"program 'dspy_rag' failed \(execution \w+\): module 'retrieve': "
                                              r"LMFactoryError: .*no API key configured"):
        Program.from_dict(data).using(app=embedded_app())(question="what is redis?")


def test_program_lm_applies_to_dspy_modules_only() -> None:
    data = rag_program()
    data["modules"]["add"] = {"uses": "tests.modules.basic:add", "inputs": {"a": 1, "b": 2}}
    data["modules"]["tool"] = {"uses": "tests.modules.basic:echo", "dspy": {"lm": "tests.modules.dspy_mods:dummy_lm"}}
    modules = Program.from_dict(data).plan().modules
    assert modules["generate"].dspy == modules["retrieve"].dspy == data["dspy"]
    assert modules["add"].dspy == {}  # a plain function runs as it is
    assert modules["tool"].dspy == {**data["dspy"], "lm": "tests.modules.dspy_mods:dummy_lm"}  # unless it asks
