"""``run``, ``validate`` and ``plan``: the commands that take a program file."""

from __future__ import annotations

import click

from dspex_celery.cli.batch import batch_options
from dspex_celery.cli.distribute import (
    is_module_reference,
    module_reference_options,
    refuse_other_options,
    run_module_reference,
)
from dspex_celery.cli.inputs import collect_inputs
from dspex_celery.cli.options import (
    Seconds,
    in_process_connection_options,
    open_runtime,
    program_argument,
    refuse_modules_on_a_cluster,
    strategy_option,
)
from dspex_celery.cli.progress import submit_and_report
from dspex_celery.cli.render import print_json
from dspex_celery.client import submit_program
from dspex_celery.errors import UsageError
from dspex_celery.program import Program
from dspex_celery.strategies.registry import choose_strategy, recommend_strategy

chosen_strategy_option = strategy_option(
    "Execution strategy (default: chosen per program: levels when every module needs the whole level "
    "above it, else dag; `plan` shows the choice and why).",
)


@click.command()
@batch_options  # --inputs-file data.jsonl [--output] [--max-in-flight] [--metric]: dspex_celery/cli/batch.py
@program_argument
@click.option("-i", "--input", "pairs", multiple=True, metavar="NAME=VALUE", help="A program input (repeatable).")
@click.option("--inputs", "inputs_file", metavar="FILE.json", default=None, help="Program inputs as a JSON object.")
@in_process_connection_options
@chosen_strategy_option
@click.option("--timeout", type=Seconds(min=0, min_open=True), default=None, help="Fail the execution after SECONDS.")
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object (the execution result).")
@click.option("-q", "--quiet", is_flag=True, help="No live progress display (there is none when not a terminal).")
@click.option("--detach", is_flag=True, help="Submit, print the execution id and exit without waiting (cluster only).")
@click.option("--no-profile", is_flag=True, help="Ignore the optimizer's profile (learned priorities and timeouts).")
@click.option("--learned-timeouts/--no-learned-timeouts", default=None,
              help="Apply the profile's learned timeouts where the program sets no timeout_s "
                   "(default: the program's 'timeouts:' key, else DSPEX_LEARNED_TIMEOUTS; off).")
@click.option("-m", "--modules", multiple=True, metavar="PKG",
              help="In-process runs: allow only modules defined in PKG (repeatable; or DSPEX_MODULES); "
                   "without it an in-process run trusts the packages its program names.")
@module_reference_options  # PROGRAM as pkg.mod:MyModule (a dspy.Module): --lm, --adapter, --with
def run(
    program_file: str,
    pairs: tuple[str, ...],
    inputs_file: str | None,
    broker: str | None,
    result_backend: str | None,
    strategy: str | None,
    timeout: float | None,
    as_json: bool,
    quiet: bool,
    detach: bool,
    no_profile: bool,
    learned_timeouts: bool | None,
    modules: tuple[str, ...],
    lm: str | None = None,
    adapter: str | None = None,
    with_pairs: tuple[str, ...] = (),
) -> None:
    """Run PROGRAM and print its outputs (in-process when no broker is configured).

    PROGRAM is a program file, or pkg.mod:MyModule, a dspy.Module class whose sub-module calls run on
    the cluster (-i gives forward's arguments, --with the constructor's)."""
    refuse_other_options(is_module_reference(program_file))
    if is_module_reference(program_file):
        run_module_reference(program_file, pairs=pairs, inputs_file=inputs_file, broker=broker,
                             result_backend=result_backend, lm=lm, adapter=adapter, with_pairs=with_pairs,
                             as_json_flag=as_json)
        return
    program = Program.from_file(program_file)
    program.plan()
    inputs = collect_inputs(pairs, inputs_file)
    runtime = open_runtime(broker, result_backend, modules=modules,
                           check=refuse_modules_on_a_cluster if modules else None)
    if detach and runtime.settings.embedded:
        raise UsageError("--detach needs a cluster (an in-process run ends with this process): "
                         "pass --broker URL or set DSPEX_BROKER_URL")
    submit_and_report(lambda: submit_program(program, inputs, strategy=strategy, app=runtime.app, timeout=timeout,
                                             use_profile=not no_profile, learned_timeouts=learned_timeouts),
                      as_json, quiet, detach)


@click.command()
@program_argument
def validate(program_file: str) -> None:
    """Check PROGRAM: schema, references, cycles, and that every module imports and takes its inputs."""
    plan = Program.from_file(program_file).plan()
    click.echo(f"{program_file}: ok ({len(plan.modules)} modules, {len(plan.levels)} levels)")


@click.command()
@program_argument
@chosen_strategy_option
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan(program_file: str, strategy: str | None, as_json: bool) -> None:
    """Show how PROGRAM would run: levels, width, critical path."""
    program_plan = Program.from_file(program_file).plan()
    described = program_plan.describe(choose_strategy(program_plan, strategy))
    described["strategy_reason"] = (
        "requested with --strategy" if strategy else recommend_strategy(program_plan)[1]
    )
    if as_json:
        print_json(described)
        return
    click.echo(f"program {described['program']}: {described['modules']} modules, "
               f"{described['depth']} levels, width {described['width']}, strategy {described['strategy']} "
               f"({described['strategy_reason']})")
    for index, level in enumerate(described["levels"]):
        click.echo(f"  level {index}: {', '.join(level)}")
    click.echo(f"  critical path: {' -> '.join(described['critical_path'])}")
