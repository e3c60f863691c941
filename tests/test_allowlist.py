"""The allow-list: a worker runs only what its packages *define*, never what they merely import.

Forged plans (stored and queued without client-side validation, as a hostile client would) go to
a real prefork worker allow-listing ``tests.modules`` and ``dspex_celery.examples``; shell commands
would drop canary files, environment copies would carry a secret set on the worker.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from dspex_celery import ExecutionStatus, ModuleStatus, Program
from dspex_celery.client import launch
from dspex_celery.errors import ModuleOutputError, ProgramError
from dspex_celery.graph import UsesRefused, resolve_uses
from dspex_celery.plan import Plan
from dspex_celery.results import ExecutionResult
from dspex_celery.runner import normalize_output
from tests.conftest import Cluster, assert_one_line_error, dspex, program

pytestmark = pytest.mark.integration

MODS = "tests.modules.allowlist_mods"
SECRET = "allowlist-secret-7f3a9c"

#: uses that would run a shell command (called with ``command=...``).
SHELL_BYPASSES = {
    "through_random": "dspex_celery.examples.synthetic:random._os.system",
    "through_os": f"{MODS}:os.system",
    "imported_function": f"{MODS}:system",
    "partial_object": f"{MODS}:shell",
    "class_builtin": f"{MODS}:Shell.run",
    "class_static_builtin": f"{MODS}:Shell.run_static",
}
#: uses that would return the worker's environment.
ENV_BYPASSES = {
    "env_through_random": "dspex_celery.examples.synthetic:random._os.environ.copy",
    "env_through_os": f"{MODS}:os.environ.copy",
    "env_imported": f"{MODS}:environ.copy",
    "env_bound_method": f"{MODS}:copy_environment",
    "env_class_attribute": f"{MODS}:Shell.env.copy",
}
#: Dunder walks (callable at the end: the old resolver handed them to the worker to call).
DUNDER_BYPASSES = {
    "subclasses": f"{MODS}:Greeter.__class__.__subclasses__",
    "object_subclasses": f"{MODS}:greeter.__class__.__base__.__subclasses__",
    "loader": f"{MODS}:__loader__.get_data",
    "globals_walk": f"{MODS}:Greeter.greet.__globals__.get",
    "builtins_walk": f"{MODS}:Greeter.greet.__builtins__.get",
    "dunder_method": f"{MODS}:greeter.__call__",
}
REEXPORTED = {"json_dumps": "dspex_celery.examples.rag:json.dumps", "imported_cache": "dspex_celery.examples.rag:cache"}


@pytest.fixture(scope="module")
def canary_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where ``tests.modules.import_canary`` leaves a file when a worker imports it."""
    return tmp_path_factory.mktemp("import-canary")


@pytest.fixture(scope="module")
def cluster(make_cluster, canary_dir: Path) -> Cluster:
    """One prefork worker (the README's) with a secret in its environment."""
    cluster = make_cluster()
    cluster.start_worker("default", concurrency=2,
                         env={"ALLOWLIST_SECRET": SECRET, "IMPORT_CANARY_DIR": str(canary_dir)})
    return cluster


def forged_run(cluster: Cluster, spec: Program, inputs: dict[str, Any] | None = None,
               edit: Any = None) -> ExecutionResult:
    """Store and queue ``spec``'s plan without the client-side checks a hostile client would skip."""
    plan: Plan = spec.plan(resolve=False)
    if edit is not None:
        edit(plan)
    handle = launch(cluster.runtime, plan, set(), inputs or {}, "levels", None)
    return handle.get(timeout=90, propagate=False)


def assert_refused(result: ExecutionResult, names: list[str]) -> None:
    for name in names:
        record = result.modules[name]
        assert record.status is ModuleStatus.FAILED, (name, record)
        assert record.error and record.error.startswith("ModuleNotAllowed: ") and "is not allowed" in record.error, (
            name, record.error)


def test_shell_bypasses_never_run_on_a_worker(cluster: Cluster, tmp_path: Path) -> None:
    # Given forged modules reaching os.system through what allowed packages import or hold
    modules = {name: {"uses": uses, "inputs": {"command": f"touch {tmp_path / name}"}}
               for name, uses in SHELL_BYPASSES.items()}
    result = forged_run(cluster, program("shell", modules, failure_tolerance="tolerant"))
    # Then no canary file exists: each is refused before it is called
    assert sorted(path.name for path in tmp_path.iterdir()) == []
    assert_refused(result, list(SHELL_BYPASSES))
    # And the refusal says why (the module passed through, or where the object is defined)
    errors = {name: result.modules[name].error or "" for name in SHELL_BYPASSES}
    assert "passes through the module 'random'" in errors["through_random"]
    assert "passes through the module 'os'" in errors["through_os"]
    assert "defined in 'posix'" in errors["imported_function"] and "defined in 'functools'" in errors["partial_object"]


def test_environment_copies_never_leak(cluster: Cluster) -> None:
    modules = {name: {"uses": uses, "inputs": {}} for name, uses in ENV_BYPASSES.items()}
    result = forged_run(cluster, program("env", modules, failure_tolerance="tolerant"))
    assert_refused(result, list(ENV_BYPASSES))
    assert SECRET not in result.model_dump_json()


def test_dunder_walks_and_reexports_are_refused(cluster: Cluster) -> None:
    bypasses = {**DUNDER_BYPASSES, **REEXPORTED}
    modules = {name: {"uses": uses, "inputs": {"path": __file__} if name == "loader" else {}}
               for name, uses in bypasses.items()}
    result = forged_run(cluster, program("dunder", modules, failure_tolerance="tolerant"))
    assert_refused(result, list(bypasses))
    assert "special attribute '__class__'" in (result.modules["subclasses"].error or "")
    assert "special attribute '__loader__'" in (result.modules["loader"].error or "")


def test_refused_dspy_factory_is_not_built(cluster: Cluster) -> None:
    # Given a forged LM factory path (validation would refuse it) on a legitimate module
    def edit(plan: Plan) -> None:
        plan.modules["greet"].dspy = {"lm": "dspex_celery.examples.synthetic:random._os.getpid"}

    spec = program("factory", {"greet": {"uses": f"{MODS}:greeter.greet", "inputs": {"name": "x"}}})
    result = forged_run(cluster, spec, edit=edit)
    assert_refused(result, ["greet"])
    assert "random._os.getpid" in (result.modules["greet"].error or "")


def test_retry_on_never_makes_a_worker_import_a_module(cluster: Cluster, canary_dir: Path) -> None:
    # Given a forged plan whose failing module names, in retry.on, a module nobody imported
    spec = program("retry_import", {"a": {"uses": "tests.modules.basic:fail",
                                          "retry": {"on": ["tests.modules.import_canary:Boom"], "max_attempts": 2}}})
    # When the module fails on the worker
    result = forged_run(cluster, spec)
    # Then it is not retried as that class, and the worker never imported the module it named
    assert result.modules["a"].status is ModuleStatus.FAILED and result.modules["a"].attempts == 1
    assert list(canary_dir.iterdir()) == []


def test_refusals_are_warnings_in_the_worker_log(cluster: Cluster) -> None:
    uses = SHELL_BYPASSES["through_random"]
    forged_run(cluster, program("logged_refusal", {"sneaky": {"uses": uses, "inputs": {"command": "true"}}}))
    log = cluster.workers[0].log.read_text(errors="replace")
    lines = [line for line in log.splitlines() if "logged_refusal" in line and "WARNING" in line]
    assert lines, log[-3000:]
    assert "'sneaky'" in lines[0] and uses in lines[0] and "is not allowed on this worker" in lines[0]


def test_legitimate_uses_keep_working(cluster: Cluster) -> None:
    # Functions, classes, methods of classes and instances defined in the package, a function of an
    # allow-listed package re-exported by another, dspy modules and an LM factory defined there
    spec = program("legit", {
        "retrieve": {"uses": "dspex_celery.examples.rag:retrieve", "inputs": {"question": "$inputs.q"}},
        "generate": {"uses": "dspex_celery.examples.rag:Generator", "with": {"prefix": "A:"},
                     "inputs": {"question": "$inputs.q", "context": "$retrieve.passages"}},
        "greet": {"uses": f"{MODS}:greeter.greet", "inputs": {"name": "bob"}},
        "shout": {"uses": f"{MODS}:Greeter.shout", "inputs": {"name": "bob"}},
        "kind": {"uses": f"{MODS}:Greeter.kind", "inputs": {"name": "bob"}},
        "reexported": {"uses": "dspex_celery.examples.dspy_rag:keyword_retrieve", "inputs": {"question": "$inputs.q"}},
        "dspy_retrieve": {"uses": "dspex_celery.examples.dspy_rag:Retrieve", "inputs": {"question": "$inputs.q"}},
        "dspy_generate": {"uses": "dspex_celery.examples.dspy_rag:Generate",
                          "dspy": {"lm": "dspex_celery.examples.dspy_rag:offline_lm"},
                          "inputs": {"question": "$inputs.q", "context": "$dspy_retrieve.passages"}},
    }, inputs=["q"], outputs={name: f"${name}" for name in ("retrieve", "generate", "greet", "shout", "kind",
                                                            "reexported", "dspy_retrieve", "dspy_generate")})
    result = cluster.run(spec, {"q": "What is Redis?"})
    assert result.status is ExecutionStatus.SUCCEEDED, {n: r.error for n, r in result.modules.items()}
    outputs = result.outputs
    assert outputs["greet"] == {"text": "hi bob"} and outputs["shout"] == {"text": "BOB"}
    assert outputs["kind"] == {"text": "Greeter:bob"} and outputs["generate"]["answer"].startswith("A: ")
    assert outputs["reexported"]["ids"] == outputs["retrieve"]["ids"] == outputs["dspy_retrieve"]["ids"]
    assert outputs["dspy_generate"]["answer"].startswith("Redis is an in-memory data store")


def test_nan_and_infinity_outputs_fail_the_module(cluster: Cluster) -> None:
    spec = program("nan", {
        "nan": {"uses": f"{MODS}:not_a_number", "inputs": {}},
        "after": {"uses": f"{MODS}:upstream_sum", "inputs": {"value": "$nan.value"}},
        "inf": {"uses": f"{MODS}:not_a_number", "inputs": {"nested": True}},
    }, failure_tolerance="tolerant")
    result = cluster.submit(spec).get(timeout=90, propagate=False)
    for name, field in (("nan", "value"), ("inf", "scores")):
        record = result.modules[name]
        assert record.status is ModuleStatus.FAILED
        assert record.error == (f"ModuleOutputError: module '{name}' output '{field}' holds NaN or Infinity, "
                                "which JSON cannot carry: return a finite number or None")
    assert result.modules["after"].status is ModuleStatus.SKIPPED  # it never receives a NaN


# --- submit time ---------------------------------------------------------------------------------


@pytest.mark.parametrize("uses", [*SHELL_BYPASSES.values(), *REEXPORTED.values(), *DUNDER_BYPASSES.values(),
                                  "dspex_celery.examples:synthetic.work"])
def test_validation_refuses_what_the_package_does_not_define(uses: str) -> None:
    with pytest.raises(ProgramError) as caught:
        program("bad", {"m": {"uses": uses, "inputs": {}}}).plan()
    assert len(caught.value.problems) == 1
    assert caught.value.problems[0].startswith(f"module 'm': uses '{uses}' is refused: ")


def test_validate_command_gives_one_line_per_refused_module(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\nmodules:\n  dump: {uses: 'dspex_celery.examples.rag:json.dumps', inputs: {obj: 1}}\n"
                    "  sub: {uses: 'dspex_celery.examples.synthetic:random._os.system'}\n")
    result = dspex("validate", str(path))
    assert_one_line_error(result, 2, "module 'dump': uses 'dspex_celery.examples.rag:json.dumps' is refused",
                          "module 'sub': uses 'dspex_celery.examples.synthetic:random._os.system' is refused: it "
                          "passes through the module 'random'")
    assert len(result.stderr.strip().splitlines()) == 2


def test_resolve_uses_checks_the_given_allow_list() -> None:
    assert resolve_uses("dspex_celery.examples.dspy_rag:keyword_retrieve", ["dspex_celery.examples"])
    with pytest.raises(UsesRefused, match="defined in 'dspex_celery.examples.rag', not in 'dspex_celery.examples.dspy_rag'"):
        resolve_uses("dspex_celery.examples.dspy_rag:keyword_retrieve", ["dspex_celery.examples.dspy_rag"])
    with pytest.raises(UsesRefused, match="outside the allowed packages"):
        resolve_uses("os:getcwd", ["dspex_celery"])


def test_normalize_output_names_nan() -> None:
    module = Program.from_dict({"name": "p", "modules": {"m": {"uses": f"{MODS}:not_a_number"}}}).plan().modules["m"]
    with pytest.raises(ModuleOutputError, match="output 'x' holds NaN or Infinity"):
        normalize_output(module, {"x": -math.inf})
    with pytest.raises(ModuleOutputError, match="output 'x' is not JSON-serialisable"):
        normalize_output(module, {"x": {1, 2}})
    assert normalize_output(module, {"x": 1.5e308}) == {"x": 1.5e308}


# --- embedded runs -------------------------------------------------------------------------------


def test_embedded_modules_restricts_the_allow_list() -> None:
    question = "question=What is Redis?"
    refused = dspex("run", "examples/rag.yaml", "--modules", "tests.modules", "-i", question)
    assert_one_line_error(refused, 2, "module 'retrieve': 'dspex_celery.examples.rag:retrieve' is outside the "
                          "allow-list (tests.modules): add --modules dspex_celery.examples.rag if you trust that module")
    allowed = dspex("run", "examples/rag.yaml", "-m", "dspex_celery.examples", "-i", question, "--json")
    assert allowed.returncode == 0, allowed.stderr
    assert json.loads(allowed.stdout)["status"] == "succeeded"


def test_embedded_modules_restricts_a_batch_run_too(tmp_path: Path) -> None:
    lines = tmp_path / "q.jsonl"
    lines.write_text('{"question": "What is Redis?"}\n')
    batch = ["run", "examples/rag.yaml", "--inputs-file", str(lines), "--output", str(tmp_path / "out.jsonl")]
    refused = dspex(*batch, "-m", "tests.modules")
    assert refused.returncode == 2 and "is outside the allow-list (tests.modules)" in refused.stderr, refused.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["q.jsonl"]  # no output, no journal left
    allowed = dspex(*batch, "-m", "dspex_celery.examples", "--json")
    assert allowed.returncode == 0, allowed.stderr
    assert json.loads(allowed.stdout)["succeeded"] == 1


def test_modules_flag_is_refused_for_a_cluster_run(cluster: Cluster) -> None:
    result = cluster.cli("run", "examples/rag.yaml", "-m", "dspex_celery.examples", "-i", "question=x",
                         "--broker", cluster.settings.broker_url or "")
    assert_one_line_error(result, 2, "--modules restricts in-process runs only")
