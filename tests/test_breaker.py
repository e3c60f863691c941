"""Circuit breakers shared by two worker processes through Redis, and the ``breakers`` command."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from click.testing import CliRunner, Result

from dspex_celery import ExecutionStatus, Settings, create_runtime, submit_program
from dspex_celery.breaker import circuits
from dspex_celery.cli import cli as dspex_cli
from dspex_celery.results import ExecutionResult
from tests.conftest import Cluster, program, wait_for
from tests.modules.faulty import side_channel

pytestmark = pytest.mark.integration

POLICY = {"failures": 3, "reset_s": 1.5}
LONG = {"failures": 3, "reset_s": 120}  # stays open while a CLI subprocess starts


@pytest.fixture(scope="module")
def cluster(make_cluster) -> Cluster:
    """Two worker processes, each the only one serving its resource class."""
    cluster = make_cluster()
    cluster.start_worker("r1", concurrency=1)
    cluster.start_worker("r2", concurrency=1)
    return cluster


def call(name: str, key: str, resource: str, seconds: float = 0.0, policy: dict[str, Any] = POLICY) -> Any:
    """Program ``name`` whose module ``call`` runs on the worker of ``resource``: the circuit
    (program + module) is the same whichever worker runs it."""
    return program(name, {"call": {
        "uses": "tests.modules.faulty:dependency", "inputs": {"key": key, "seconds": seconds},
        "resource": resource, "circuit_breaker": policy, "retry": {"max_attempts": 1},
    }})


def dspex(cluster: Cluster, *args: str) -> Result:
    """The CLI in this process (a subprocess is tested once, for the exit code and stderr)."""
    return CliRunner().invoke(dspex_cli, list(args), env=cluster.env(), catch_exceptions=False)


def error(result: ExecutionResult) -> str:
    return result.modules["call"].error or ""


def calls(key: str) -> int:
    return int(side_channel().hget(key, "calls") or 0)


def circuit(cluster: Cluster, name: str) -> dict[str, Any] | None:
    return next((c for c in circuits(cluster.runtime.store) if c["name"] == name), None)


def setup_dependency(cluster: Cluster, down: bool) -> tuple[str, str]:
    name, key = f"brk_{uuid.uuid4().hex[:6]}", f"{cluster.settings.namespace}:side:{uuid.uuid4().hex[:8]}"
    if down:
        side_channel().set(f"{key}:down", 1, ex=600)
    return name, key


def open_circuit(cluster: Cluster, name: str, key: str, policy: dict[str, Any] = POLICY) -> list[ExecutionResult]:
    runs = [cluster.run(call(name, key, resource, policy=policy)) for resource in ("r1", "r2", "r1")]
    assert [error(run) for run in runs] == ["ValueError: dependency is down"] * 3
    return runs


def test_breaker_opens_across_workers_fails_fast_and_half_opens(cluster: Cluster) -> None:
    name, key = setup_dependency(cluster, down=True)
    circuit_name = f"{name}.call"
    # Given three failed calls, on two different worker processes
    runs = open_circuit(cluster, name, key)
    assert len({run.modules["call"].worker for run in runs}) == 2
    assert calls(key) == 3
    # Then the circuit is open for both workers: attempts fail fast, the module is not called
    for resource in ("r2", "r1"):
        result = cluster.run(call(name, key, resource))
        assert result.status is ExecutionStatus.FAILED and result.modules["call"].attempts == 1
        assert error(result).startswith(f"CircuitOpen: circuit '{circuit_name}' is open")
    assert calls(key) == 3
    # When reset_s has passed, one trial call is made; it fails, so the circuit opens again
    wait_for(lambda: circuit(cluster, circuit_name)["state"] == "half_open", what="the circuit to half-open")
    assert error(cluster.run(call(name, key, "r2"))) == "ValueError: dependency is down"
    assert error(cluster.run(call(name, key, "r1"))).startswith("CircuitOpen:")
    assert calls(key) == 4
    # A trial whose execution is cancelled (its process terminated) hands the trial back at once
    wait_for(lambda: circuit(cluster, circuit_name)["state"] == "half_open", what="the circuit to half-open")
    doomed = cluster.submit(call(name, key, "r1", seconds=30))
    wait_for(lambda: calls(key) == 5, what="the trial call to start")
    assert circuit(cluster, circuit_name)["trial_running"]
    doomed.cancel()
    wait_for(lambda: not circuit(cluster, circuit_name)["trial_running"], what="the trial to be released")
    # When the dependency is back: exactly one trial at a time
    side_channel().delete(f"{key}:down")
    trial = cluster.submit(call(name, key, "r1", seconds=2.0))
    wait_for(lambda: calls(key) == 6, what="the trial call to start")
    concurrent = cluster.run(call(name, key, "r2"))
    assert error(concurrent).startswith("CircuitOpen:") and calls(key) == 6
    assert trial.get(timeout=30).status is ExecutionStatus.SUCCEEDED
    # And the trial's success closed the circuit: calls go through on both workers again
    for resource in ("r2", "r1"):
        assert cluster.run(call(name, key, resource)).status is ExecutionStatus.SUCCEEDED
    assert calls(key) == 8 and circuit(cluster, circuit_name) is None


def test_errors_the_policy_ignores_do_not_count_and_hand_a_trial_back(cluster: Cluster) -> None:
    # A module that fails on bad data (ValueError) in a batch must not open the circuit for the good lines
    name, key = setup_dependency(cluster, down=True)
    ignoring = {**POLICY, "ignore": ["builtins:ValueError"]}
    runs = [cluster.run(call(name, key, resource, policy=ignoring)) for resource in ("r1", "r2", "r1", "r2")]
    assert [error(run) for run in runs] == ["ValueError: dependency is down"] * 4
    assert calls(key) == 4 and circuit(cluster, f"{name}.call") is None
    # Given the circuit opened by errors that count, When its trial fails with an ignored one,
    # Then the trial is handed back (no verdict): the next call is a trial again, not CircuitOpen
    open_circuit(cluster, name, key)
    wait_for(lambda: circuit(cluster, f"{name}.call")["state"] == "half_open", what="the circuit to half-open")
    for resource in ("r2", "r1"):
        assert error(cluster.run(call(name, key, resource, policy=ignoring))) == "ValueError: dependency is down"
    assert calls(key) == 9
    assert circuit(cluster, f"{name}.call")["state"] == "half_open"


def test_breakers_reset_closes_a_circuit(cluster: Cluster) -> None:
    name, key = setup_dependency(cluster, down=True)
    circuit_name = f"{name}.call"
    open_circuit(cluster, name, key, LONG)
    # `breakers --json` and `breakers` show the open circuit
    cli = dspex(cluster, "breakers", "--json")
    assert cli.exit_code == 0, cli.output
    shown = {c["name"]: c for c in json.loads(cli.stdout)}[circuit_name]
    assert shown["state"] == "open" and shown["failures"] == 3 and shown["threshold"] == 3
    assert 0 < shown["retry_in_s"] <= 120
    human = dspex(cluster, "breakers")
    assert human.exit_code == 0 and circuit_name in human.stdout and "open" in human.stdout
    assert error(cluster.run(call(name, key, "r2", policy=LONG))).startswith("CircuitOpen:")
    # When the circuit is reset, the next attempt calls the module again
    reset = dspex(cluster, "breakers", "reset", circuit_name)
    assert reset.exit_code == 0 and reset.stdout.strip() == f"circuit {circuit_name} closed"
    assert error(cluster.run(call(name, key, "r2", policy=LONG))) == "ValueError: dependency is down"
    assert calls(key) == 4
    # A name that is no circuit is a usage error with one clear line
    unknown = cluster.cli("breakers", "reset", "nope.call")
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr
    assert unknown.stderr.strip().startswith("error: no circuit named 'nope.call'")


def test_breaker_in_embedded_mode() -> None:
    # The in-process store (fakeredis with Lua) runs the same scripts
    app = create_runtime(Settings(namespace=f"embedded-breaker-{uuid.uuid4().hex[:6]}")).app
    prog = program("embedded_brk", {"bad": {"uses": "tests.modules.basic:fail", "circuit_breaker": POLICY}})
    errors = [submit_program(prog, {}, app=app).get(timeout=30, propagate=False).modules["bad"].error
              for _ in range(4)]
    assert errors[:3] == ["ValueError: boom"] * 3
    assert errors[3].startswith("CircuitOpen: circuit 'embedded_brk.bad' is open")
