"""``run pkg.mod:MyModule``: a ``dspy.Module`` class run with :func:`dspex_celery.distribute`.

``-i``/``--inputs`` are ``forward``'s arguments, ``--with k=v`` the constructor's, ``--lm`` and
``--adapter`` the factories workers build them with. With ``--inputs-file`` each JSON line is one
forward (``--max-in-flight`` at once); the execution id of each line is journaled before it runs,
so a re-run of a killed batch replays its lines under the same ids and no finished call runs again.
"""

from __future__ import annotations

import inspect
import json
import re
import sys
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from dspex_celery.batch import Metric, resolve_metric
from dspex_celery.cli.inputs import check_output, collect_inputs, parse_value
from dspex_celery.cli.options import open_runtime
from dspex_celery.client import new_execution_id
from dspex_celery.errors import DspexError, InputError, UsageError
from dspex_celery.graph import resolve_uses
from dspex_celery.integrations.dspy_values import make_example
from dspex_celery.runtime import Runtime

#: ``package.module:Class`` (what ``run`` takes instead of a program file).
MODULE_REFERENCE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")
DEFAULT_MAX_IN_FLIGHT = 8


def module_reference_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """``run``'s options for a module reference: ``--lm``, ``--adapter``, ``--with``."""
    command = click.option("--with", "with_pairs", multiple=True, metavar="NAME=VALUE",
                           help="pkg.mod:MyModule: a constructor argument (repeatable).")(command)
    command = click.option("--adapter", metavar="PKG.MOD:FACTORY", default=None,
                           help="pkg.mod:MyModule: the factory workers build the DSPy adapter with.")(command)
    return click.option("--lm", metavar="PKG.MOD:FACTORY", default=None,
                        help="pkg.mod:MyModule: the factory workers build the LM with (no key crosses "
                             "the broker).")(command)


#: ``run`` options only a module reference takes, and those only a program file takes.
MODULE_ONLY = ("lm", "adapter", "with_pairs")
PROGRAM_ONLY = ("strategy", "detach", "no_profile", "learned_timeouts", "modules", "timeout")


def refuse_other_options(module_reference: bool) -> None:
    """One line for a ``run`` option the kind of PROGRAM given does not take."""
    context = click.get_current_context()
    for name in PROGRAM_ONLY if module_reference else MODULE_ONLY:
        if context.get_parameter_source(name) not in (None, ParameterSource.DEFAULT):
            flag = "--with" if name == "with_pairs" else f"--{name.replace('_', '-')}"
            needs = "a program file" if module_reference else "a module reference (pkg.mod:MyModule)"
            raise UsageError(f"{flag} applies to {needs} only")


def is_module_reference(argument: str) -> bool:
    """True for ``pkg.mod:Class`` that is not a file of that name."""
    return bool(MODULE_REFERENCE.fullmatch(argument)) and not Path(argument).exists()


def constructor_args(pairs: tuple[str, ...]) -> dict[str, Any]:
    """``--with k=v`` pairs (values parsed as JSON when they are)."""
    values: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or not name:
            raise UsageError(f"--with expects NAME=VALUE, got '{pair}'")
        values[name] = parse_value(text)
    return values


def build_distributed(reference: str, runtime: Runtime, lm: str | None, adapter: str | None,
                      with_pairs: tuple[str, ...]) -> Any:
    """The class at ``reference`` built with ``--with`` and distributed (a UsageError line if not)."""
    from dspex_celery.integrations.distribute import distribute  # needs dspy (optional): only for module refs

    try:
        cls = resolve_uses(reference)
    except ImportError as exc:
        raise UsageError(f"{reference}: cannot be imported ({exc}): check the module path") from None
    with_ = constructor_args(with_pairs)
    dspy = sys.modules.get("dspy")
    if not (isinstance(cls, type) and dspy is not None and issubclass(cls, dspy.Module)):
        raise UsageError(f"{reference} is not a dspy.Module class: pass a program file or a dspy.Module subclass")
    try:
        instance = cls(**with_)
    except Exception as exc:  # the user's constructor may raise anything
        raise UsageError(f"{reference}: cannot build {cls.__qualname__}(**{with_!r}) ({type(exc).__name__}: {exc}): "
                         "pass its constructor's arguments with --with NAME=VALUE") from None
    return distribute(instance, lm=lm, adapter=adapter, app=runtime.app, with_=with_)


def as_json(value: Any) -> Any:
    """A forward's return value as JSON (a Prediction's fields)."""
    if hasattr(value, "toDict"):
        return as_json(dict(value.toDict()))
    if isinstance(value, Mapping):
        return {str(key): as_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [as_json(item) for item in value]
    return value


def run_module_reference(reference: str, *, pairs: tuple[str, ...], inputs_file: str | None, broker: str | None,
                         result_backend: str | None, lm: str | None, adapter: str | None,
                         with_pairs: tuple[str, ...], as_json_flag: bool) -> None:
    """Run one forward of the module at ``reference`` and print what it returned."""
    runtime = open_runtime(broker, result_backend)
    module = build_distributed(reference, runtime, lm, adapter, with_pairs)
    execution_id = new_execution_id()
    print_outputs(execution_id, as_json(module.run(execution_id, **collect_inputs(pairs, inputs_file))), as_json_flag)


def is_distributed(runtime: Runtime, execution_id: str) -> bool:
    """True for an execution that ``distribute(module)`` ran (its meta names the module)."""
    return runtime.store.meta_field(execution_id, "distribute") is not None


def resume_distributed(runtime: Runtime, execution_id: str, as_json_flag: bool) -> None:
    """``resume`` of a distributed execution: replay ``forward``; finished calls are not run again."""
    from dspex_celery.integrations.distribute import resume_forward  # needs dspy (optional)

    print_outputs(execution_id, as_json(resume_forward(execution_id, app=runtime.app)), as_json_flag)


def print_outputs(execution_id: str, value: Any, as_json_flag: bool) -> None:
    if as_json_flag:
        click.echo(json.dumps({"execution_id": execution_id, "status": "succeeded", "outputs": value}))
        return
    click.echo(f"execution {execution_id} succeeded")
    for key, item in (value.items() if isinstance(value, dict) else [("result", value)]):
        click.echo(f"  {key}: {json.dumps(item)}")


def run_module_batch(reference: str, *, batch_file: str, output: str | None, max_in_flight: int | None,
                     broker: str | None, result_backend: str | None, lm: str | None, adapter: str | None,
                     with_pairs: tuple[str, ...], as_json_flag: bool, metric: str | None = None) -> None:
    """One forward per JSON line of ``batch_file`` (keys that are not forward's arguments are labels,
    scored with ``metric``); results in input order; exit 1 if any line failed."""
    target = Path(output) if output else Path(batch_file).with_name(f"{Path(batch_file).stem}.results.jsonl")
    check_output(target, ("--inputs-file", batch_file))
    runtime = open_runtime(broker, result_backend)
    module = build_distributed(reference, runtime, lm, adapter, with_pairs)
    score = resolve_metric(metric) if metric else None
    lines = read_lines(Path(batch_file))
    journal = target.with_name(target.name + ".partial")
    ids = journaled_ids(journal)
    with journal.open("a", encoding="utf-8") as log:
        for index in range(len(lines)):
            if index not in ids:
                ids[index] = new_execution_id()
                log.write(json.dumps({"line": index, "execution_id": ids[index]}) + "\n")
    with ThreadPoolExecutor(max_in_flight or DEFAULT_MAX_IN_FLIGHT) as pool:
        results = list(pool.map(lambda item: run_line(module, ids[item[0]], item[1], score), enumerate(lines)))
    target.write_text("".join(json.dumps(result) + "\n" for result in results), encoding="utf-8")
    journal.unlink(missing_ok=True)
    failed = sum(result["status"] != "succeeded" for result in results)
    summary: dict[str, Any] = {"lines": len(results), "succeeded": len(results) - failed, "failed": failed,
                               "output": str(target)}
    if score is not None:
        scores = [float(result.get("score", 0.0)) for result in results]
        summary["score"] = round(100 * sum(scores) / max(len(scores), 1), 2)
    click.echo(json.dumps(summary) if as_json_flag else
               f"{reference}: {summary['succeeded']}/{len(results)} lines succeeded"
               + (f", score {summary['score']}" if score is not None else "") + f"; results in {target}")
    raise SystemExit(1 if failed else 0)


def run_line(module: Any, execution_id: str, line: dict[str, Any], metric: Metric | None) -> dict[str, Any]:
    """One line's forward under its journaled id (a replay when that id ran before), scored when asked."""
    accepted = forward_parameters(module.module)
    inputs = {key: value for key, value in line.items() if key in accepted}
    labels = {key: value for key, value in line.items() if key not in accepted}
    try:
        value = module.run(execution_id, **inputs)
    except DspexError as exc:
        return {"execution_id": execution_id, "inputs": inputs, "status": "failed", "error": str(exc)}
    result = {"execution_id": execution_id, "inputs": inputs, "status": "succeeded", "outputs": as_json(value)}
    if metric is not None:
        result["score"] = float(metric(make_example(inputs, labels), value))
    return result


def forward_parameters(module: Any) -> set[str]:
    """The names ``forward`` takes (a line's other keys are labels)."""
    return set(list(inspect.signature(type(module).forward).parameters)[1:])


def read_lines(path: Path) -> list[dict[str, Any]]:
    try:
        texts = [text for text in path.read_text(encoding="utf-8").splitlines() if text.strip()]
    except FileNotFoundError:
        raise InputError(f"inputs file {path} not found: check the path") from None
    lines = []
    for number, text in enumerate(texts, 1):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path} line {number} is not JSON ({exc.msg})") from None
        if not isinstance(value, dict):
            raise InputError(f"{path} line {number} must be a JSON object of forward's arguments")
        lines.append(value)
    return lines


def journaled_ids(journal: Path) -> dict[int, str]:
    """The execution id journaled for each line by an earlier (killed) run of the batch."""
    if not journal.exists():
        return {}
    entries = [json.loads(text) for text in journal.read_text(encoding="utf-8").splitlines() if text.strip()]
    return {int(entry["line"]): str(entry["execution_id"]) for entry in entries}
