"""Every error a user can cause: one line on stderr, no traceback, the right exit code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REDIS_URL, ROOT, assert_one_line_error, dspex


def write(tmp_path: Path, data: object, name: str = "program.yaml") -> str:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


ADD = "tests.modules.basic:add"


def test_missing_program_file() -> None:
    result = dspex("run", "no/such/program.yaml")
    assert_one_line_error(result, 2, "no/such/program.yaml", "file not found")


def test_invalid_yaml(tmp_path: Path) -> None:
    result = dspex("validate", write(tmp_path, "name: x\nmodules: [unclosed\n"))
    assert_one_line_error(result, 2, "invalid YAML at line")


def test_invalid_json(tmp_path: Path) -> None:
    result = dspex("validate", write(tmp_path, '{"name": "x",', name="p.json"))
    assert_one_line_error(result, 2, "invalid JSON at line 1")


def test_program_file_that_is_not_utf8_text(tmp_path: Path) -> None:
    path = tmp_path / "program.yaml"
    path.write_bytes(b"\xfe\xffname: x\n")
    assert_one_line_error(dspex("validate", str(path)), 2, "not UTF-8 text (byte 0xfe at offset 0)")


def test_yaml_alias_that_contains_itself(tmp_path: Path) -> None:
    text = f"name: r\nmodules:\n  a: {{uses: '{ADD}', inputs: {{a: 1, b: &l [1, *l]}}}}\n"
    assert_one_line_error(dspex("run", write(tmp_path, text)), 2, "modules.a.inputs.b.1: a YAML alias refers to a "
                          "value that contains it")
    # an alias shared by two modules is fine
    shared = f"name: s\nmodules:\n  a: {{uses: '{ADD}', inputs: &s {{a: 1, b: 2}}}}\n  b: {{uses: '{ADD}', inputs: *s}}\n"
    assert dspex("validate", write(tmp_path, shared)).returncode == 0


def test_duplicate_module_names(tmp_path: Path) -> None:
    text = f"name: d\nmodules:\n  a: {{uses: '{ADD}'}}\n  a: {{uses: '{ADD}'}}\n"
    result = dspex("validate", write(tmp_path, text))
    assert_one_line_error(result, 2, "duplicate key 'a' at line 4")


def test_cycle_one_line(tmp_path: Path) -> None:
    program = {"name": "c", "modules": {"a": {"uses": ADD, "depends_on": ["b"]}, "b": {"uses": ADD, "depends_on": ["a"]}}}
    result = dspex("run", write(tmp_path, program))
    assert_one_line_error(result, 2, "cycle: ")
    assert len(result.stderr.strip().splitlines()) == 1


def test_unknown_module_reference_and_unresolvable_uses(tmp_path: Path) -> None:
    program = {
        "name": "u",
        "modules": {"a": {"uses": "nope.mod:fn"}, "b": {"uses": ADD, "inputs": {"a": "$ghost.x", "b": 1}}},
    }
    result = dspex("validate", write(tmp_path, program))
    assert_one_line_error(result, 2, "unknown module 'ghost'", "uses 'nope.mod:fn' cannot be resolved")
    assert len(result.stderr.strip().splitlines()) == 2


def test_literal_that_json_cannot_carry(tmp_path: Path) -> None:
    # An unquoted YAML date is a date, not a string: it could not travel to a worker as JSON
    text = f"name: d\nmodules:\n  a: {{uses: '{ADD}', inputs: {{a: 1, b: 2}}, with: {{since: 2024-01-01}}}}\n"
    for command in ("validate", "run"):
        result = dspex(command, write(tmp_path, text))
        assert_one_line_error(result, 2, "module 'a' with 'since': 2024-01-01 (date) is not a JSON value",
                              "quote it")


def test_missing_input() -> None:
    result = dspex("run", "examples/rag.yaml")
    assert_one_line_error(result, 2, "missing input question", "-i question=VALUE")


def test_unknown_input() -> None:
    result = dspex("run", "examples/rag.yaml", "-i", "question=x", "-i", "colour=red")
    assert_one_line_error(result, 2, "unknown input colour", "takes question")


def test_malformed_input_flag() -> None:
    result = dspex("run", "examples/rag.yaml", "-i", "question")
    assert_one_line_error(result, 2, "-i expects NAME=VALUE")


def test_inputs_file_problems(tmp_path: Path) -> None:
    bad = tmp_path / "inputs.json"
    bad.write_text("[1, 2]")
    assert_one_line_error(dspex("run", "examples/rag.yaml", "--inputs", str(bad)), 2, "must hold a JSON object")
    assert_one_line_error(dspex("run", "examples/rag.yaml", "--inputs", str(tmp_path / "none.json")), 2, "not found")


def test_unreachable_broker_leaves_nothing_behind() -> None:
    result = dspex("run", "examples/rag.yaml", "-i", "question=x", "--broker", "redis://127.0.0.1:1/0")
    assert_one_line_error(result, 2, "cannot reach", "127.0.0.1:1")


def test_unknown_strategy_is_a_usage_error() -> None:
    result = dspex("run", "examples/rag.yaml", "-i", "question=x", "--strategy", "fastest")
    assert result.returncode == 2 and "Traceback" not in result.stderr and "fastest" in result.stderr


def test_non_json_output_fails_the_execution(tmp_path: Path) -> None:
    # Given a module whose output holds bytes
    program = {"name": "nj", "modules": {"a": {"uses": "tests.modules.basic:not_json"}}}
    # When it runs (embedded)
    result = dspex("run", write(tmp_path, program), "--json")
    # Then the execution fails with exit 1 and the record names the field and the fix
    assert result.returncode == 1, result.stderr
    data = json.loads(result.stdout)
    assert data["status"] == "failed"
    error = data["modules"]["a"]["error"]
    assert "output 'blob' is not JSON-serialisable" in error and "return JSON types" in error


def test_worker_without_broker_or_modules() -> None:
    assert_one_line_error(dspex("worker"), 2, "a worker needs a broker")
    result = dspex("worker", "--broker", REDIS_URL, "--modules", "no_such_pkg_xyz")
    assert_one_line_error(result, 2, "cannot import allow-listed package 'no_such_pkg_xyz'")


@pytest.mark.parametrize("command", ["run", "validate", "plan", "worker"])
def test_help_works(command: str) -> None:
    result = dspex(command, "--help")
    assert result.returncode == 0 and "Usage:" in result.stdout


def test_module_entry_point() -> None:
    result = subprocess.run([sys.executable, "-m", "dspex_celery", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "run" in result.stdout


def nan_program(tmp_path: Path) -> str:
    return write(tmp_path, {"name": "n", "inputs": ["x"], "modules": {"m": {"uses": "tests.modules.basic:echo",
                                                                             "inputs": {"x": "$inputs.x"}}}})


@pytest.mark.parametrize(("value", "shown"), [("NaN", "'x': nan"), ("-Infinity", "'x': -inf"), ("1e999", "'x': inf"),
                                              ('[1, {"a": NaN}]', "'x'[1]['a']: nan")])
def test_nan_input_flag(tmp_path: Path, value: str, shown: str) -> None:
    result = dspex("run", nan_program(tmp_path), "-i", f"x={value}")
    assert_one_line_error(result, 2, f"-i {shown} is not a JSON number (JSON cannot carry NaN or infinity)")


def test_nan_in_inputs_file(tmp_path: Path) -> None:
    inputs = tmp_path / "inputs.json"
    inputs.write_text('{"x": {"scores": [0.5, Infinity]}}')
    result = dspex("run", nan_program(tmp_path), "--inputs", str(inputs))
    assert_one_line_error(result, 2, f"inputs file {inputs}: input 'x'['scores'][1]: inf is not a JSON number")


def test_nan_in_batch_lines(tmp_path: Path) -> None:
    lines = tmp_path / "lines.jsonl"
    lines.write_text('{"x": 1}\n{"x": NaN}\n{"x": [-Infinity]}\n')
    output = tmp_path / "out.jsonl"
    result = dspex("run", nan_program(tmp_path), "--inputs-file", str(lines), "--output", str(output))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [record["status"] for record in records] == ["succeeded", "invalid", "invalid"]
    assert records[1]["error"] == ("line 2: input 'x': nan is not a JSON number (JSON cannot carry NaN or "
                                   "infinity): pass a finite number, or a string")
    assert records[2]["error"].startswith("line 3: input 'x'[0]: -inf is not a JSON number")


def test_deeply_nested_input_values(tmp_path: Path) -> None:
    nested = "[" * 5000 + "]" * 5000
    assert_one_line_error(dspex("run", nan_program(tmp_path), "-i", f"x={nested}"), 2, "-i value nests too deeply")
    inputs = tmp_path / "inputs.json"
    inputs.write_text('{"x": %s}' % nested)
    assert_one_line_error(dspex("run", nan_program(tmp_path), "--inputs", str(inputs)), 2, "nests too deeply")


def test_program_that_is_a_directory(tmp_path: Path) -> None:
    for command in ("run", "validate", "plan"):
        assert_one_line_error(dspex(command, str(tmp_path)), 2, str(tmp_path), "is a directory")


def test_inputs_file_that_is_a_directory_or_not_utf8(tmp_path: Path) -> None:
    assert_one_line_error(dspex("run", "examples/rag.yaml", "--inputs", str(tmp_path)), 2, "Is a directory")
    binary = tmp_path / "inputs.json"
    binary.write_bytes(b"\xa0\xff{}")
    assert_one_line_error(dspex("run", "examples/rag.yaml", "--inputs", str(binary)), 2, "not UTF-8 text")
    assert_one_line_error(dspex("run", "examples/rag.yaml", "--inputs-file", str(binary), "--output",
                                str(tmp_path / "out.jsonl")), 2, "not UTF-8 text")


def test_batch_output_that_cannot_be_written_is_refused_before_any_line_runs(tmp_path: Path) -> None:
    lines = tmp_path / "lines.jsonl"
    lines.write_text('{"question": "x"}\n')
    missing = tmp_path / "no" / "such" / "out.jsonl"
    assert_one_line_error(dspex("run", "examples/rag.yaml", "--inputs-file", str(lines), "--output", str(missing)),
                          2, "does not exist")
    folder = tmp_path / "results"
    folder.mkdir()
    for fresh in ((), ("--fresh",)):
        result = dspex("run", "examples/rag.yaml", "--inputs-file", str(lines), "--output", str(folder), *fresh)
        assert_one_line_error(result, 2, "is a directory")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["lines.jsonl", "results"]  # nothing left behind
    assert not list(folder.iterdir())


def test_a_batch_output_that_names_a_file_it_reads_is_refused_and_the_file_kept(tmp_path: Path) -> None:
    lines = tmp_path / "lines.jsonl"
    lines.write_text('{"question": "x"}\n')
    inputs = tmp_path / "inputs.json"
    inputs.write_text("{}")
    program = tmp_path / "rag.yaml"
    program.write_text((ROOT / "examples" / "rag.yaml").read_text())
    (tmp_path / "link.jsonl").symlink_to(lines)
    kept = {path: path.read_text() for path in (lines, inputs, program)}
    for output, option in ((lines, "--inputs-file"), (tmp_path / "." / "link.jsonl", "--inputs-file"),
                           (inputs, "--inputs"), (program, "program")):
        result = dspex("run", str(program), "--inputs-file", str(lines), "--inputs", str(inputs), "--output", str(output))
        assert_one_line_error(result, 2, f"is the {option} file", "pick another --output")
    assert {path: path.read_text() for path in kept} == kept
    assert sorted(path.name for path in tmp_path.iterdir()) == ["inputs.json", "lines.jsonl", "link.jsonl", "rag.yaml"]


def test_the_same_batch_running_twice_at_once_is_refused(tmp_path: Path) -> None:
    import fcntl

    lines = tmp_path / "lines.jsonl"
    lines.write_text('{"question": "x"}\n')
    output = tmp_path / "out.jsonl"
    with (tmp_path / "out.jsonl.partial").open("a") as journal:  # as a running batch holds it
        fcntl.flock(journal.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = dspex("run", "examples/rag.yaml", "--inputs-file", str(lines), "--output", str(output))
    assert_one_line_error(result, 2, "another batch is running into", "pick another --output")
    assert not output.exists()
    ran = dspex("run", "examples/rag.yaml", "--inputs-file", str(lines), "--output", str(output))
    assert ran.returncode == 0, ran.stderr


@pytest.mark.parametrize(("text", "fragment"), [("broker_url: [\n", "invalid YAML at line 2"),
                                                ("- a\n- b\n", "must be a mapping"),
                                                ("state_ttl_s: 0\n", "state_ttl_s: Input should be greater than 0"),
                                                ("brokr_url: redis://x\n", "unknown setting 'brokr_url' (did you mean 'broker_url'?)")])
def test_config_file_problems(tmp_path: Path, text: str, fragment: str) -> None:
    config = tmp_path / "dspex.yaml"
    config.write_text(text)
    result = dspex("--config", str(config), "run", "examples/rag.yaml", "-i", "question=x")
    assert_one_line_error(result, 2, fragment)


def test_resources_variable_that_is_not_json() -> None:
    result = dspex("run", "examples/rag.yaml", "-i", "question=x", env={"DSPEX_RESOURCES": "{bad"})
    assert_one_line_error(result, 2, "resources", "DSPEX_")


def test_worker_resource_classes() -> None:
    from dspex_celery.cli.worker import resource_classes

    assert resource_classes(()) == ("default",)
    assert resource_classes(("io,llm", "default", "io")) == ("io", "llm", "default")
    for bad in ("a b", "1x", "h1.llm"):
        assert_one_line_error(dspex("worker", "--resource", bad), 2, f"--resource '{bad}' is not a resource class")
    assert_one_line_error(dspex("worker", "--resource", ""), 2, "--resource is empty")


@pytest.mark.parametrize("value", ["nan", "inf", "1e400", "0"])
def test_a_timeout_that_is_not_a_finite_positive_number_is_a_usage_error(value: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    result = dspex("run", "examples/rag.yaml", "-i", "question=x", "--timeout", value,
                   env={"XDG_DATA_HOME": str(data)})
    assert result.returncode == 2 and "Invalid value for '--timeout'" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not data.exists()  # nothing ran, so no history was written


@pytest.mark.parametrize("command", [("worker", "-c", "1", "-b", REDIS_URL), ("run", "examples/rag.yaml", "-i", "question=x")])
@pytest.mark.parametrize("entry", [".", "../pkg", "pkg/modules"])
def test_an_allow_list_entry_that_is_not_a_package_name_is_one_line(command: tuple[str, ...], entry: str) -> None:
    result = dspex(*command, "--modules", entry, timeout=30)
    assert_one_line_error(result, 2, f"'{entry}' is not a package name", "--modules")


#: An integer longer than Python converts from text (its int_max_str_digits limit, 4300 by default).
HUGE = "9" * (sys.get_int_max_str_digits() + 1)


def test_an_integer_longer_than_python_converts_is_one_line_wherever_it_is(tmp_path: Path) -> None:
    inputs = tmp_path / "inputs.json"
    inputs.write_text(f'{{"question": {HUGE}}}')
    program = {"name": "huge", "modules": {"a": {"uses": "dspex_celery.examples.synthetic:work", "inputs": {"n": "N"}}}}
    as_json = json.dumps(program).replace('"N"', HUGE)
    files = {"p.json": as_json, "p.yaml": as_json}  # JSON is YAML too: the YAML loader reads it
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    fragment = "integer of more than"
    assert_one_line_error(dspex("run", "examples/rag.yaml", "-i", f"question={HUGE}"), 2, "-i value", fragment)
    assert_one_line_error(dspex("run", "examples/rag.yaml", "--inputs", str(inputs)), 2, str(inputs), fragment)
    for name in files:
        for command in ("validate", "plan", "run"):
            assert_one_line_error(dspex(command, str(tmp_path / name)), 2, name, fragment)


def test_a_batch_line_beyond_the_parsers_limits_is_an_invalid_line_and_the_rest_runs(tmp_path: Path) -> None:
    lines = tmp_path / "lines.jsonl"
    deep = "[" * 50_000 + "]" * 50_000
    lines.write_text(f'{{"question": {HUGE}}}\n{{"question": "redis"}}\n{{"question": {deep}}}\n')
    result = dspex("run", "examples/rag.yaml", "--inputs-file", str(lines), env={"XDG_DATA_HOME": str(tmp_path / "d")})
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    out = [json.loads(text) for text in (tmp_path / "lines.results.jsonl").read_text().splitlines()]
    assert [line["status"] for line in out] == ["invalid", "succeeded", "invalid"]
    assert "integer of more than" in out[0]["error"] and "nests too deeply" in out[2]["error"]
    assert not (tmp_path / "lines.results.jsonl.partial").exists()


@pytest.mark.parametrize("command", [("status",), ("run", "examples/rag.yaml", "-i", "question=x"),
                                     ("worker", "-c", "1", "--modules", "dspex_celery.examples")])
@pytest.mark.parametrize(("urls", "fragments"), [
    (("--broker", "redis://:s3cret@127.0.0.1:notaport/11"), ("broker_url", "port", "is not a number", "--broker")),
    (("--broker", "amqp://guest:s3cret@127.0.0.1:5672//", "--result-backend", "redis://:s3cret@127.0.0.1:6379/abc"),
     ("result_backend", "database 'abc' is not a number", "--result-backend")),
    (("--broker", REDIS_URL, "--result-backend", "redis-cluster://:s3cret@127.0.0.1:1"),
     ("cannot reach the Redis Cluster at 127.0.0.1:1", "redis-cluster://")),
])
def test_a_malformed_or_unreachable_url_is_one_line_without_its_password(
        command: tuple[str, ...], urls: tuple[str, ...], fragments: tuple[str, ...]) -> None:
    result = dspex(*command, *urls, timeout=60)
    assert_one_line_error(result, 2, *fragments)
    assert "s3cret" not in result.stderr + result.stdout


def test_optimize_of_a_program_file_that_is_not_there_says_so(tmp_path: Path) -> None:
    env = {"XDG_DATA_HOME": str(tmp_path / "data")}
    assert_one_line_error(dspex("optimize", str(tmp_path / "gone.yaml"), env=env), 2, "gone.yaml not found")
    assert_one_line_error(dspex("optimize", str(tmp_path), env=env), 2, "is a directory")


def test_an_inputs_file_that_is_a_directory_names_the_fix(tmp_path: Path) -> None:
    assert_one_line_error(dspex("run", "examples/rag.yaml", "--inputs-file", str(tmp_path)), 2,
                          "Is a directory", "name a JSON Lines file")
