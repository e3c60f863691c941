"""`dspex-celery report`: one self-contained, escaped HTML file of a real execution."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from dspex_celery import ExecutionResult, ExecutionStatus, ModuleRecord, ModuleStatus
from dspex_celery.cli import cli
from dspex_celery.report import ReportData, headline, render_html, store_attempts
from dspex_celery.results import isoformat
from tests.conftest import Cluster, program

pytestmark = pytest.mark.integration

HOSTILE_ERROR = "<script>alert('pwned')</script>"


def parse(html: str) -> ET.Element:
    """The report is well-formed (XHTML-compatible) HTML: parse it strictly."""
    assert html.startswith("<!DOCTYPE html>\n")
    return ET.fromstring(html.split("\n", 1)[1])


def assert_self_contained(html: str) -> None:
    """No element that loads or runs anything, no attribute that points anywhere, no URL."""
    assert not re.search(r"(https?:)?//[\w.-]", html), "external URL"
    assert "@import" not in html and not re.search(r"url\((?!#)", html)
    for element in parse(html).iter():
        assert element.tag.lower() not in {"script", "link", "iframe", "img", "object", "embed"}, element.tag
        assert not {name.lower().rsplit("}", 1)[-1] for name in element.attrib} & {"src", "href"}, element.attrib
        assert not any(name.lower().startswith("on") for name in element.attrib), element.attrib


@pytest.fixture(scope="module")
def cluster(make_cluster) -> Cluster:
    cluster = make_cluster()
    cluster.start_worker("default", "io", concurrency=3, pool="threads")
    return cluster


@pytest.fixture(scope="module")
def executed(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, ExecutionResult]:
    """A real tolerant execution with a retried module and a failure with a hostile message; its report."""
    markers = tmp_path_factory.mktemp("markers")
    prog = program("reported", {
        "fetch": {"uses": "tests.modules.ops_mods:hold", "inputs": {"seconds": 0.2}, "resource": "io"},
        "flaky": {"uses": "tests.modules.ops_mods:flaky", "inputs": {"marker_dir": str(markers), "key": "r"},
                  "retry": {"max_attempts": 2, "backoff_s": 0}},
        "bad": {"uses": "tests.modules.ops_mods:hostile", "depends_on": ["fetch"]},
        "join": {"uses": "tests.modules.basic:add", "inputs": {"a": "$fetch.started", "b": "$flaky.calls"}},
    }, failure_tolerance="tolerant")
    handle = cluster.submit(prog)
    finished = handle.get(timeout=60)
    time.sleep(0.2)  # the report is written later than the execution finished
    out = markers / "report.html"
    result = CliRunner().invoke(cli, ["report", handle.execution_id, "-o", str(out)], env=cluster.env())
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)
    return handle.execution_id, out.read_text(encoding="utf-8"), finished


def test_report_shows_every_module_and_attempt(executed: tuple[str, str, ExecutionResult]) -> None:
    execution_id, html, _ = executed
    root = parse(html)
    rows = [row.findall("td") for row in root.iter("tr") if row.findall("td")]
    assert [cells[0].text for cells in rows] == ["fetch", "flaky", "bad", "join"]  # plan order
    assert {cells[0].text: cells[1].text for cells in rows} == {
        "fetch": "succeeded", "flaky": "succeeded", "bad": "failed", "join": "succeeded"}
    assert {cells[0].text: cells[2].text for cells in rows}["flaky"] == "2"
    # The timeline: one bar per attempt, the retried attempt and the failure marked
    statuses = sorted(g.get("data-status") for g in root.iter("g") if g.get("class") == "attempt")
    assert statuses == ["failed", "retrying", "succeeded", "succeeded", "succeeded"]
    critical = [rect for rect in root.iter("rect") if "critical" in (rect.get("class") or "").split()]
    assert critical, "no attempt on the critical path is highlighted"
    assert execution_id in html


def test_report_header_is_the_executions_own(executed: tuple[str, str, ExecutionResult]) -> None:
    # Given a tolerant execution that succeeded with one failed module, reported after it finished
    _, html, finished = executed
    root = parse(html)
    # Then the header says so in its own colour, with the execution's own submit and finish times
    status = by_id(root, "status")
    assert (status.text, status.get("class")) == ("succeeded with 1 failed module", "status-partial")
    assert re.search(r"\.status-partial \{ color: #e65100; \}", html)
    assert finished.finished_at and by_id(root, "finished").text == finished.finished_at
    assert by_id(root, "submitted").text == finished.submitted_at


def test_report_shows_retried_attempts_errors(executed: tuple[str, str, ExecutionResult]) -> None:
    # Given `flaky` failed once and succeeded on its retry
    root = parse(executed[1])
    errors = {cells[0].text: ["".join(line.itertext()) for line in cells[-1]]
              for cells in (row.findall("td") for row in root.iter("tr")) if cells}
    # Then its row shows the first attempt's error; the failed module shows its own, unnumbered
    assert errors["flaky"] == ["attempt 1 (retrying): TransientError: flaky call 1 of r"]
    assert len(errors["bad"]) == 1 and HOSTILE_ERROR in errors["bad"][0] and not errors["bad"][0].startswith("attempt")
    assert errors["fetch"] == [] and errors["join"] == []


def by_id(root: ET.Element, element_id: str) -> ET.Element:
    return next(element for element in root.iter() if element.get("id") == element_id)


@pytest.mark.parametrize(("status", "failed", "shown"), [
    (ExecutionStatus.SUCCEEDED, [], ("succeeded", "status-succeeded")),
    (ExecutionStatus.SUCCEEDED, ["a", "b"], ("succeeded with 2 failed modules", "status-partial")),
    (ExecutionStatus.FAILED, ["a"], ("failed", "status-failed")),
    (ExecutionStatus.CANCELLED, [], ("cancelled", "status-cancelled")),
])
def test_headline(status: ExecutionStatus, failed: list[str], shown: tuple[str, str]) -> None:
    result = ExecutionResult(execution_id="e", program="p", strategy="dag", status=status, outputs={}, modules={},
                             failed_modules=failed)
    assert headline(result) == shown


def test_report_is_self_contained_and_escaped(executed: tuple[str, str, ExecutionResult]) -> None:
    _, html, _ = executed
    assert_self_contained(html)
    assert HOSTILE_ERROR not in html and "&lt;script&gt;alert(&#39;pwned&#39;)&lt;/script&gt;" in html


def test_report_renders_in_headless_chromium(executed: tuple[str, str], tmp_path: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (Debian package `chromium`)")
    page = tmp_path / "report.html"
    page.write_text(executed[1], encoding="utf-8")
    shot = tmp_path / "report.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=1200,700", page.as_uri()],
                   capture_output=True, timeout=90, check=True)
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 20_000  # a blank page is a few kB


def test_unknown_execution_is_one_line(cluster: Cluster) -> None:
    result = CliRunner().invoke(cli, ["report", "nope", "-o", "/dev/null"], env=cluster.env())
    assert result.exit_code == 2
    assert result.stderr.startswith("error: unknown or expired execution 'nope' in the state store at redis://")
    assert "pass --result-backend URL of the cluster that ran it" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_output_in_a_missing_directory_is_one_line(cluster: Cluster, executed: tuple[str, str, ExecutionResult],
                                                   tmp_path: Path) -> None:
    target = tmp_path / "no" / "such" / "report.html"
    result = CliRunner().invoke(cli, ["report", executed[0], "-o", str(target)], env=cluster.env())
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: cannot write the report to {target} (No such file or directory)")
    assert len(result.stderr.strip().splitlines()) == 1 and not target.parent.exists()


def test_hostile_names_are_escaped() -> None:
    # Names that validation would refuse, to check the renderer itself escapes everything
    hostile = '<img src=x onerror="alert(1)">'
    base = program("p", {"ok": {"uses": "tests.modules.basic:add", "inputs": {"a": 1, "b": 1}}}).plan()
    plan = replace(base, program="<b>prog</b>", modules={hostile: replace(base.modules["ok"], name=hostile)},
                   levels=[[hostile]], critical_path=[hostile])
    start = datetime(2025, 1, 1, tzinfo=UTC)
    record = ModuleRecord(status=ModuleStatus.FAILED, attempts=1, started_at=isoformat(start),
                          finished_at=isoformat(start + timedelta(seconds=1)), worker='w<&>"',
                          error='</td></tr></table><script>alert("x")</script>')
    result = ExecutionResult(execution_id='e"><script>', program=plan.program, strategy="levels",
                             status=ExecutionStatus.FAILED, outputs={}, modules={hostile: record},
                             error=record.error, submitted_at=isoformat(start))
    html = render_html(ReportData(result, plan, store_attempts([], result.modules), [hostile], "test"))
    parse(html)
    assert_self_contained(html)
    for raw in (hostile, "<b>prog</b>", 'w<&>"', "<script>", 'e"><script>'):
        assert raw not in html
    assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in html and "w&lt;&amp;&gt;&#34;" in html


def test_report_prefers_history_and_outlives_the_state_store(tmp_path: Path) -> None:
    # Given an in-process run that records history (SQLite) with a retried module, and `side`
    # waiting for the one `io` slot that `first` holds
    from dspex_celery import Settings, create_runtime, submit_program
    from dspex_celery.history.hooks import EmbeddedRecorder
    from dspex_celery.report import load_report

    runtime = create_runtime(Settings(namespace=f"rep-{tmp_path.name}", history_url=f"sqlite:///{tmp_path}/h.db",
                                      resources={"io": {"max_concurrent": 1}}))
    prog = program("remembered", {
        "flaky": {"uses": "tests.modules.ops_mods:flaky", "inputs": {"marker_dir": str(tmp_path), "key": "h"},
                  "retry": {"max_attempts": 2, "backoff_s": 0}},
        "after": {"uses": "tests.modules.basic:add", "inputs": {"a": "$flaky.calls", "b": 1}},
        "first": {"uses": "tests.modules.ops_mods:hold", "inputs": {"seconds": 0.3}, "resource": "io"},
        "side": {"uses": "tests.modules.ops_mods:hold", "inputs": {"seconds": 0.05}, "resource": "io",
                 "depends_on": []},
    })
    handle = submit_program(prog, {}, app=runtime.app)
    assert handle.get(timeout=30).succeeded
    for hook in runtime.hooks.hooks:
        if isinstance(hook, EmbeddedRecorder):
            hook.flush()
    # Then the report takes its attempts from history
    data = load_report(runtime, handle.execution_id)
    assert data.source == "history"
    assert sorted((a.module, a.attempt, a.status) for a in data.attempts) == [
        ("after", 1, "succeeded"), ("first", 1, "succeeded"), ("flaky", 1, "retrying"), ("flaky", 2, "succeeded"),
        ("side", 1, "succeeded")]
    # And history kept the wait for the resource slot (one of the two io modules waited for the other)
    assert max(a.waited_s for a in data.attempts if a.module in ("first", "side")) > 0.04
    # And once the state store forgot the execution, the report still comes from history
    store = runtime.store
    store.client.delete(*store.client.keys(store.key(handle.execution_id, "*")))
    again = load_report(runtime, handle.execution_id)
    assert again.source == "history" and again.result.modules["after"].status is ModuleStatus.SUCCEEDED
    assert sorted((a.module, a.attempt) for a in again.attempts) == [
        ("after", 1), ("first", 1), ("flaky", 1), ("flaky", 2), ("side", 1)]
    assert "after" in render_html(again)
