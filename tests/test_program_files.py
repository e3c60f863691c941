"""Hostile and surprising program files and inputs: alias bombs, deep nesting, YAML 1.1 booleans as
keys, NaN and infinity. Each is one clear line and exit 2, quickly; the README's own examples work."""

from __future__ import annotations

import json
import math
import re
import subprocess
import time
from pathlib import Path

import pytest

from dspex_celery import Program, ProgramError
from dspex_celery.errors import InputError
from tests.conftest import ROOT, Cluster, assert_one_line_error, dspex

ECHO = "tests.modules.basic:echo"
TIMES_OUT_ONCE = "tests.modules.program_files_mods:times_out_once"
README = ROOT / "README.md"


def header(name: str) -> str:
    return f"name: {name}\nmodules:\n  m:\n    uses: {ECHO}\n    inputs:\n      v: "


def timed(*args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    result = dspex(*args, timeout=30)
    return result, time.monotonic() - started


# --- alias expansion ---------------------------------------------------------------------------------


def billion_laughs(tmp_path: Path) -> Path:
    """Nine levels of nine aliases: ~550 bytes that expand to 9**10 values when walked as a tree."""
    lines = [header("laughs") + "*i", "a: &a [x, x, x, x, x, x, x, x, x]"]
    for level, previous in zip("bcdefghi", "abcdefgh"):
        lines.append(f"{level}: &{level} [" + ", ".join([f"*{previous}"] * 9) + "]")
    path = tmp_path / "laughs.yaml"
    # the aliases are defined before 'modules' uses them: anchors must come first in YAML
    path.write_text("\n".join(lines[1:]) + "\n" + lines[0] + "\n")
    return path


def test_billion_laughs_fails_at_once_with_one_line(tmp_path: Path) -> None:
    laughs = billion_laughs(tmp_path)
    assert len(laughs.read_bytes()) < 600
    # baseline: how long the CLI takes to validate a small program on this machine
    small = tmp_path / "small.yaml"
    small.write_text(header("small") + "[x, x]\n")
    baseline, startup = timed("validate", str(small))
    assert baseline.returncode == 0, baseline.stderr
    for command in ("validate", "run"):
        result, elapsed = timed(command, str(laughs))
        assert_one_line_error(result, 2, "YAML aliases expand the file by more than 100,000 values (the limit)")
        # walking the expansion would take minutes; the margin absorbs a loaded machine's startup noise
        assert elapsed < 2 * startup + 2.0, f"{command} took {elapsed:.1f} s (a small program: {startup:.1f} s)"


def test_alias_expansion_is_checked_without_walking_it(tmp_path: Path) -> None:
    # In process, the bound is found in well under a second (the walk visits each distinct value once)
    started = time.monotonic()
    with pytest.raises(ProgramError, match=r"[a-i]\.\d+: YAML aliases expand"):
        Program.from_file(billion_laughs(tmp_path))
    assert time.monotonic() - started < 1.0


def test_shared_aliases_within_the_limit_run(tmp_path: Path) -> None:
    # Five levels of four aliases (256 copies of the first list) is an ordinary program: it runs
    parts = ["&a [1, 2, 3, 4]"] + [f"&{level} [" + ", ".join([f"*{previous}"] * 4) + "]"
                                   for level, previous in zip("bcde", "abcd")]
    path = tmp_path / "shared.yaml"
    path.write_text(header("shared").replace("      v: ", "      parts:\n") +
                    "".join(f"        - {part}\n" for part in parts) + "      v: *e\n")
    result = dspex("run", str(path), "--json")
    assert result.returncode == 0, result.stderr
    value = json.loads(result.stdout)["outputs"]["m"]["v"]
    assert value[3][2][1][0] == [1, 2, 3, 4] and json.dumps(value).count("[1, 2, 3, 4]") == 4**4


# --- nesting depth -------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
@pytest.mark.parametrize("depth", [300, 5000])
def test_deep_nesting_is_one_line(tmp_path: Path, depth: int, suffix: str) -> None:
    path = tmp_path / f"deep{suffix}"
    nested = "[" * depth + "]" * depth
    if suffix == ".json":
        path.write_text(json.dumps({"name": "deep", "modules": {"m": {"uses": ECHO, "inputs": {"v": []}}}})
                        .replace("[]", nested))
    else:
        path.write_text(header("deep") + nested + "\n")
    for command in ("validate", "run"):
        result, elapsed = timed(command, str(path))
        assert_one_line_error(result, 2, "nest more than 100 levels deep (the limit)")
        assert elapsed < 20


def test_nesting_through_aliases_counts(tmp_path: Path) -> None:
    # Three aliases of 90 levels each: no line nests past the limit, the value does (270 levels)
    def block(name: str, inner: str) -> str:
        return f"{name}: &{name} " + "[" * 90 + inner + "]" * 90
    path = tmp_path / "chained.yaml"
    path.write_text("\n".join([block("a", ""), block("b", "*a"), block("c", "*b")]) + "\n" + header("c") + "*c\n")
    assert_one_line_error(dspex("validate", str(path)), 2, "b.0.0.0.0.0...: mappings and lists nest more than 100")


def test_nesting_within_the_limit_runs(tmp_path: Path) -> None:
    path = tmp_path / "nested.yaml"
    path.write_text(header("nested") + "[" * 90 + "7" + "]" * 90 + "\n")
    result = dspex("run", str(path), "--json")
    assert result.returncode == 0, result.stderr
    value = json.loads(result.stdout)["outputs"]["m"]["v"]
    for _ in range(90):
        value = value[0]
    assert value == 7


# --- YAML 1.1 booleans --------------------------------------------------------------------------------


def readme_retry_example() -> str:
    """The YAML block of README's fault-tolerance section (the one that shows ``retry.on``)."""
    blocks = re.findall(r"```yaml\n(.*?)```", README.read_text(), flags=re.DOTALL)
    return next(block for block in blocks if "on: [httpx:ReadTimeout]" in block)


def test_readme_retry_example_validates(tmp_path: Path) -> None:
    example = readme_retry_example().replace("uses: ...", f"uses: {ECHO}")
    path = tmp_path / "retry.yaml"
    path.write_text("name: readme_retry\n" + example)
    result = dspex("validate", str(path))
    assert result.returncode == 0, result.stderr
    defaults = Program.from_file(path).spec.defaults
    assert defaults.retry is not None and defaults.retry.on == ("httpx:ReadTimeout",)


@pytest.fixture(scope="module")
def cluster(make_cluster) -> Cluster:
    cluster = make_cluster()
    cluster.start_worker(concurrency=2)
    return cluster


def test_readme_retry_on_retries_on_a_worker(cluster: Cluster, tmp_path: Path) -> None:
    # Given README's example with one more module that keeps the defaults' retry (on: ReadTimeout)
    marker = tmp_path / "calls"
    example = readme_retry_example().replace("uses: ...", f"uses: {ECHO}")
    fetch = f"  fetch: {{uses: '{TIMES_OUT_ONCE}', inputs: {{marker: '{marker}'}}}}\n"
    path = tmp_path / "retry.yaml"
    path.write_text("name: readme_retry\n" + example + fetch)
    # When it runs on a worker, the ReadTimeout of the first call is retried: it is named by retry.on
    result = cluster.cli("run", str(path), "--json")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)["modules"]["fetch"]
    assert record["status"] == "succeeded" and record["attempts"] == 2
    assert marker.read_text() == "2"


def test_modules_named_like_yaml_booleans_run_on_a_worker(cluster: Cluster, tmp_path: Path) -> None:
    path = tmp_path / "booleans.yaml"
    path.write_text(
        "name: booleans\nmodules:\n"
        f"  on: {{uses: {ECHO}, inputs: {{value: 1, flag: yes}}}}\n"
        f"  off: {{uses: {ECHO}, inputs: {{value: $on.value}}}}\n"
        f"  yes: {{uses: {ECHO}, depends_on: ['off', 'on']}}\n"
        "outputs: {first: $on, second: $off.value}\n"
    )
    result = cluster.cli("run", str(path), "--json")
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    # keys are the names spelled; values stay YAML's booleans ('flag: yes' is true)
    assert outcome["outputs"] == {"first": {"value": 1, "flag": True}, "second": 1}
    assert set(outcome["modules"]) == {"on", "off", "yes"}


def test_a_boolean_where_a_name_belongs_says_to_quote_it(tmp_path: Path) -> None:
    path = tmp_path / "unquoted.yaml"
    path.write_text(f"name: unquoted\nmodules:\n  on: {{uses: {ECHO}}}\n  b: {{uses: {ECHO}, depends_on: [on]}}\n")
    assert_one_line_error(dspex("validate", str(path)), 2,
                          "modules.b.depends_on.0: True is a boolean, not a string", "quote it")


def test_merge_keys_share_module_settings(tmp_path: Path) -> None:
    # '<<: *a' copies module a's keys; b's own keys win
    path = tmp_path / "merge.yaml"
    path.write_text(
        "name: merge\nmodules:\n"
        f"  a: &a {{uses: '{ECHO}', timeout_s: 5, inputs: {{x: 1}}}}\n"
        "  b: {<<: *a, timeout_s: 9}\n"
    )
    assert dspex("validate", str(path)).returncode == 0
    modules = Program.from_file(path).spec.modules
    assert modules["b"].uses == ECHO and modules["b"].inputs == {"x": 1}
    assert (modules["a"].timeout_s, modules["b"].timeout_s) == (5, 9)


# --- NaN and infinity ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("suffix", "text", "where", "shown"), [
    (".yaml", "inputs: {v: .nan}", "modules.m.inputs.v", "nan"),
    (".yaml", "with: {limits: [1, -.inf]}", "modules.m.with.limits.1", "-inf"),
    (".json", '"inputs": {"v": {"w": Infinity}}', "modules.m.inputs.v.w", "inf"),
])
def test_nan_and_infinity_literals_are_program_errors(
    tmp_path: Path, suffix: str, text: str, where: str, shown: str
) -> None:
    path = tmp_path / f"nan{suffix}"
    if suffix == ".json":
        path.write_text('{"name": "nan", "modules": {"m": {"uses": "%s", %s}}}' % (ECHO, text))
    else:
        path.write_text(f"name: nan\nmodules:\n  m: {{uses: {ECHO}, {text}}}\n")
    for command in ("validate", "run"):
        assert_one_line_error(dspex(command, str(path)), 2,
                              f"{where}: {shown} is not a JSON number (JSON cannot carry NaN or infinity)")


@pytest.mark.parametrize("value", [math.nan, math.inf, [1.0, {"deep": -math.inf}]])
def test_submit_program_refuses_nan_inputs(cluster: Cluster, value: object) -> None:
    program = Program.from_dict({"name": "nan", "inputs": ["x"], "modules": {"m": {"uses": ECHO, "inputs": {"x": "$inputs.x"}}}})
    stored = set(cluster.runtime.store.client.scan_iter(match=f"{cluster.settings.namespace}:x:*"))
    with pytest.raises(InputError, match="input 'x'.*is not a JSON number"):
        cluster.submit(program, {"x": value})
    # nothing was stored: no new execution in the namespace
    assert set(cluster.runtime.store.client.scan_iter(match=f"{cluster.settings.namespace}:x:*")) == stored

