"""Execution report: one self-contained HTML file (inline SVG Gantt by worker lane + duration table).

Per-attempt data comes from the SQL history when it knows the execution, else from the state
store: workers log every finished attempt there (``StateStore.attempts``; a module's record keeps
only its last one), and the module records fill in what the log lacks.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import jinja2

from dspex_celery.errors import ConfigError, UnknownExecution
from dspex_celery.graph import critical_path
from dspex_celery.optimizer import plan_graph
from dspex_celery.plan import Plan
from dspex_celery.results import ExecutionResult, ModuleRecord, parse_time, utcnow
from dspex_celery.runtime import Runtime
from dspex_celery.settings import Settings, redact
from dspex_celery.usage import total_usage, usage_cells

if TYPE_CHECKING:
    from dspex_celery.history.store import HistoryStore

log = logging.getLogger(__name__)

# --- report data -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Attempt:
    """One attempt of one module on one worker (``end`` None: still running)."""

    module: str
    attempt: int
    status: str
    worker: str
    start: datetime
    end: datetime | None
    waited_s: float = 0.0
    error: str | None = None


@dataclass
class ReportData:
    result: ExecutionResult
    plan: Plan
    attempts: list[Attempt]
    critical_path: list[str]
    source: str
    generated_at: datetime = field(default_factory=utcnow)


def load_report(runtime: Runtime, execution_id: str) -> ReportData:
    """Everything the report shows: history's attempts when it has them all, else the store's.

    An execution the state store no longer knows (expired) comes from history alone.
    """
    history = open_history(runtime.settings)
    try:
        result, plan = _from_store(runtime, execution_id)
    except UnknownExecution as unknown:
        if history is None:
            raise
        try:
            result, plan = _from_history(history, execution_id)
        except UnknownExecution:
            raise UnknownExecution(f"{unknown}; history at {history.display_url} does not have it either") from None
        attempts, source = [], "history"
    else:
        attempts, source = store_attempts(runtime.store.attempts(execution_id), result.modules), "state store"
    recorded = history_attempts(history, execution_id) if history is not None else []
    if recorded and len(recorded) >= len(attempts):  # the listener may lag behind a fresh execution
        attempts, source = recorded, "history"
    return ReportData(result, plan, attempts, observed_critical_path(plan, attempts), source)


def _from_store(runtime: Runtime, execution_id: str) -> tuple[ExecutionResult, Plan]:
    from dspex_celery.client import ExecutionHandle

    try:
        result = ExecutionHandle(runtime, execution_id).current()
    except UnknownExecution:
        raise UnknownExecution(
            f"unknown or expired execution '{execution_id}' in the state store at {redact(runtime.settings.state_url)}: "
            "check the id, or pass --result-backend URL of the cluster that ran it"
        ) from None
    plan = runtime.store.plan(execution_id)
    assert plan is not None  # current() checked it
    return result, plan  # an ended execution's snapshot keeps its own finish time


def open_history(settings: Settings) -> HistoryStore | None:
    """The history database when one is configured and exists (never created here)."""
    from dspex_celery.history.store import HistoryStore, history_url, sqlite_path

    url = history_url(settings)
    path = sqlite_path(url) if url is not None else None
    if url is None or (path is not None and not path.exists()):  # opening SQLite would create the file
        return None
    try:
        return HistoryStore(url, create=False)
    except ConfigError as exc:
        log.info("no history for the report: %s", exc)
        return None


def _from_history(history: HistoryStore, execution_id: str) -> tuple[ExecutionResult, Plan]:
    result = history.result(execution_id)  # UnknownExecution (one line) when history lacks it too
    row = history.execution(execution_id)
    plan = history.plan(row.fingerprint) if row is not None and row.fingerprint else None
    if plan is None:
        raise UnknownExecution(f"history has execution '{execution_id}' but not its plan: no report possible")
    return result, plan


def history_attempts(history: HistoryStore, execution_id: str) -> list[Attempt]:
    """Every recorded attempt of the execution (attempt 0, never started, is left out)."""
    rows = history.attempts([execution_id])
    found = [_attempt(row.module, row.attempt, ModuleRecord.model_validate(row.record)) for row in rows if row.attempt]
    return _in_order(found)


def store_attempts(logged: list[dict[str, Any]], modules: dict[str, ModuleRecord]) -> list[Attempt]:
    """Attempts from the log, plus each module's current record when the log lacks it."""
    found = [_attempt(entry["module"], int(entry["attempt"]), ModuleRecord.model_validate(entry)) for entry in logged]
    seen = {(attempt.module, attempt.attempt) for attempt in found if attempt}
    found += [_attempt(name, record.attempts, record) for name, record in modules.items()
              if (name, record.attempts) not in seen]
    return _in_order(found)


def _in_order(found: list[Attempt | None]) -> list[Attempt]:
    return sorted((attempt for attempt in found if attempt), key=lambda attempt: (attempt.start, attempt.module))


def _attempt(module: str, number: int, record: ModuleRecord) -> Attempt | None:
    if not record.started_at:
        return None
    return Attempt(
        module=module,
        attempt=number,
        status=record.status.value,
        worker=record.worker or "?",
        start=parse_time(record.started_at),
        end=parse_time(record.finished_at) if record.finished_at else None,
        waited_s=record.waited_s or 0.0,
        error=record.error,
    )


def module_spans(attempts: list[Attempt], now: datetime) -> dict[str, float]:
    """Seconds from each module's first start (its wait included) to its last end."""
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    for attempt in attempts:
        start = attempt.start.timestamp() - attempt.waited_s
        end = (attempt.end or now).timestamp()
        first[attempt.module] = min(first.get(attempt.module, start), start)
        last[attempt.module] = max(last.get(attempt.module, end), end)
    return {name: last[name] - first[name] for name in first}


def observed_critical_path(plan: Plan, attempts: list[Attempt]) -> list[str]:
    """The longest dependency chain weighted by what each module actually took."""
    return critical_path(plan_graph(plan), module_spans(attempts, utcnow()))


# --- layout --------------------------------------------------------------------------------------

LABEL_W = 230
PLOT_W = 900
ROW_H = 22
LANE_GAP = 10
AXIS_H = 28
CHAR_W = 6.6


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    w: float
    wait_x: float
    wait_w: float
    status: str
    critical: bool
    label: str
    title: str
    marker: str


@dataclass(frozen=True)
class Lane:
    name: str
    y: float
    h: float


@dataclass
class Gantt:
    width: float
    height: float
    lanes: list[Lane]
    bars: list[Bar]
    ticks: list[tuple[float, str]]


def _pack(attempts: list[Attempt], now: datetime) -> list[tuple[Attempt, int]]:
    """Sub-rows in a worker lane so that overlapping attempts (concurrency > 1) do not overlap."""
    row_ends: list[datetime] = []
    placed = []
    for attempt in sorted(attempts, key=lambda attempt: attempt.start.timestamp() - attempt.waited_s):
        start = attempt.start - timedelta(seconds=attempt.waited_s)  # its wait is drawn too
        row = next((i for i, end in enumerate(row_ends) if end <= start), len(row_ends))
        if row == len(row_ends):
            row_ends.append(start)
        row_ends[row] = attempt.end or now
        placed.append((attempt, row))
    return placed


def nice_step(span_s: float, ticks: int = 8) -> float:
    raw = max(span_s, 1e-3) / ticks
    magnitude = 10 ** math.floor(math.log10(raw))
    return next(step * magnitude for step in (1, 2, 5, 10) if step * magnitude >= raw)


def layout(data: ReportData) -> Gantt:
    now = data.generated_at
    submitted = parse_time(data.result.submitted_at) if data.result.submitted_at else None
    starts = [a.start.timestamp() - a.waited_s for a in data.attempts]
    t0 = min([*starts, *([submitted.timestamp()] if submitted else [])], default=now.timestamp())
    t1 = max([(a.end or now).timestamp() for a in data.attempts], default=t0 + 1)
    scale = PLOT_W / max(t1 - t0, 1e-3)
    critical = set(data.critical_path)
    lanes, bars, y = [], [], float(AXIS_H)
    for worker in sorted({a.worker for a in data.attempts}):
        placed = _pack([a for a in data.attempts if a.worker == worker], now)
        rows = max(row for _, row in placed) + 1
        lanes.append(Lane(worker, y, rows * ROW_H))
        for attempt, row in placed:
            bars.append(_bar(attempt, y + row * ROW_H, t0, scale, now, attempt.module in critical))
        y += rows * ROW_H + LANE_GAP
    step = nice_step(t1 - t0)
    ticks = [(LABEL_W + i * step * scale, f"{i * step:g}s") for i in range(int((t1 - t0) / step) + 1)]
    return Gantt(LABEL_W + PLOT_W + 20, y + 4, lanes, bars, ticks)


MARKERS = {"failed": "\u2717", "retrying": "\u21bb", "cancelled": "\u2205"}


def _bar(attempt: Attempt, y: float, t0: float, scale: float, now: datetime, critical: bool) -> Bar:
    start = attempt.start.timestamp()
    end = (attempt.end or now).timestamp()
    x = LABEL_W + (start - t0) * scale
    width = max((end - start) * scale, 2.0)
    label = attempt.module if attempt.attempt <= 1 else f"{attempt.module} #{attempt.attempt}"
    title = (f"{attempt.module} attempt {attempt.attempt}: {attempt.status}, {end - start:.3f}s"
             f"{f', waited {attempt.waited_s:.3f}s' if attempt.waited_s else ''} on {attempt.worker}"
             f"{f' - {attempt.error}' if attempt.error else ''}")
    return Bar(
        x=round(x, 2), y=y + 3, w=round(width, 2),
        wait_x=round(x - attempt.waited_s * scale, 2), wait_w=round(attempt.waited_s * scale, 2),
        status=attempt.status, critical=critical,
        label=label if len(label) * CHAR_W + 8 <= width else "",
        title=title, marker=MARKERS.get(attempt.status, ""),
    )


# --- table ---------------------------------------------------------------------------------------


def module_rows(data: ReportData) -> list[dict[str, Any]]:
    """One row per module in plan order: status, attempts, wait, run time, span, workers, error."""
    spans = module_spans(data.attempts, data.generated_at)
    critical = set(data.critical_path)
    rows = []
    for name in data.plan.topological_order():
        record = data.result.modules[name]
        mine = [a for a in data.attempts if a.module == name]
        run_s = sum(((a.end or data.generated_at) - a.start).total_seconds() for a in mine)
        rows.append({
            "module": name,
            "status": record.status.value,
            "attempts": record.attempts,
            "resource": record.resource or "",
            "waited": f"{sum(a.waited_s for a in mine):.3f}" if any(a.waited_s for a in mine) else "",
            "run": f"{run_s:.3f}" if mine else "",
            "span": f"{spans[name]:.3f}" if name in spans else "",
            "workers": ", ".join(sorted({a.worker for a in mine})),
            "critical": name in critical,
            "errors": module_errors(record, mine),
            "lm": dict(zip(("tokens", "cost", "cache"), usage_cells(record), strict=True)),
        })
    return rows


def module_errors(record: ModuleRecord, attempts: list[Attempt]) -> list[str]:
    """Every error of a module: each attempt's (numbered once it was retried), then its record's own."""
    retried = record.attempts > 1 or len(attempts) > 1
    errors = [f"attempt {a.attempt} ({a.status}): {a.error}" if retried else a.error
              for a in attempts if a.error]
    if record.error and all(a.error != record.error for a in attempts):
        errors.append(record.error)  # e.g. skipped or cancelled before it started
    return errors


def headline(result: ExecutionResult) -> tuple[str, str]:
    """The execution's status as the header shows it, and its CSS class.

    A tolerant execution that succeeded with failed modules says so, in its own colour.
    """
    failed = len(result.failed_modules)
    if result.succeeded and failed:
        return f"succeeded with {failed} failed module{'s' if failed > 1 else ''}", "status-partial"
    return result.status.value, f"status-{result.status.value}"


# --- HTML ----------------------------------------------------------------------------------------

_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8"/>
<title>{{ r.program }} {{ r.execution_id }} - dspex-celery report</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 20px; margin: 0 0 4px; }
.meta { color: #555; margin-bottom: 16px; }
.status-succeeded { color: #2e7d32; } .status-failed { color: #c62828; } .status-partial { color: #e65100; }
.status-cancelled { color: #616161; }
svg text { font: 11px system-ui, sans-serif; }
.lane { fill: #f4f5f7; } .lane-label { fill: #333; }
.tick { stroke: #ddd; } .tick-label { fill: #777; }
.bar { stroke: none; } .bar-label { fill: #fff; pointer-events: none; }
.s-succeeded { fill: #43a047; } .s-failed { fill: #e53935; } .s-retrying { fill: #fb8c00; }
.s-running { fill: #1e88e5; } .s-cancelled { fill: #9e9e9e; } .s-skipped { fill: #bdbdbd; }
.critical { stroke: #111; stroke-width: 2.5; }
.wait { fill: url(#hatch); stroke: #999; stroke-width: 0.5; }
.marker { fill: #000; font-weight: bold; }
table { border-collapse: collapse; margin-top: 16px; }
th, td { border-bottom: 1px solid #e5e5e5; padding: 4px 10px; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.critical td { background: #fff8e1; }
.legend span { display: inline-block; margin-right: 14px; }
.swatch { display: inline-block; width: 12px; height: 12px; margin-right: 4px; vertical-align: -1px; }
.error { color: #b71c1c; white-space: pre-wrap; max-width: 520px; }
h2 { font-size: 16px; margin: 20px 0 0; }
</style>
</head>
<body>
<h1>{{ r.program }} <span id="status" class="{{ status_class }}">{{ status_text }}</span></h1>
<div class="meta">execution {{ r.execution_id }} &#183; strategy {{ r.strategy }} &#183;
submitted <span id="submitted">{{ r.submitted_at or "?" }}</span> &#183;
finished <span id="finished">{{ r.finished_at or "not yet" }}</span> &#183;
{{ data.attempts | length }} attempts of {{ r.modules | length }} modules &#183; data from {{ data.source }}</div>
{% if r.error %}<p class="error">error: {{ r.error }}</p>{% endif %}
{% if not usage.empty %}<p id="usage" class="meta">LM usage: {{ usage.describe() }}</p>{% endif %}
<div class="legend">
<span><i class="swatch" style="background:#43a047"></i>succeeded</span>
<span><i class="swatch" style="background:#fb8c00"></i>failed, retried {{ markers.retrying }}</span>
<span><i class="swatch" style="background:#e53935"></i>failed {{ markers.failed }}</span>
<span><i class="swatch" style="background:#1e88e5"></i>running</span>
<span><i class="swatch" style="background:#9e9e9e"></i>cancelled</span>
<span><i class="swatch" style="background:#fff;border:1px dashed #999"></i>waiting for a resource slot</span>
<span><i class="swatch" style="background:#fff;border:2.5px solid #111"></i>critical path</span>
</div>
<svg id="timeline" role="img" aria-label="timeline of module attempts by worker"
 width="{{ g.width }}" height="{{ g.height }}" viewBox="0 0 {{ g.width }} {{ g.height }}">
<defs><pattern id="hatch" width="6" height="6" patternUnits="userSpaceOnUse" patternTransform="rotate(45)">
<rect width="6" height="6" fill="#fafafa"/><line x1="0" y1="0" x2="0" y2="6" stroke="#aaa" stroke-width="2"/></pattern></defs>
{% for lane in g.lanes %}<rect class="lane" x="0" y="{{ lane.y }}" width="{{ g.width }}" height="{{ lane.h }}"/>
<text class="lane-label" x="6" y="{{ lane.y + 15 }}">{{ lane.name | truncate(34, True, "...") }}<title>{{ lane.name }}</title></text>
{% endfor %}{% for x, label in g.ticks %}<line class="tick" x1="{{ x }}" y1="{{ 18 }}" x2="{{ x }}" y2="{{ g.height }}"/>
<text class="tick-label" x="{{ x + 2 }}" y="14">{{ label }}</text>
{% endfor %}{% for b in g.bars %}<g class="attempt" data-status="{{ b.status }}">
{% if b.wait_w > 0 %}<rect class="wait" x="{{ b.wait_x }}" y="{{ b.y }}" width="{{ b.wait_w }}" height="{{ row_h - 6 }}"/>{% endif %}
<rect class="bar s-{{ b.status }}{% if b.critical %} critical{% endif %}" x="{{ b.x }}" y="{{ b.y }}" width="{{ b.w }}" height="{{ row_h - 6 }}" rx="2"><title>{{ b.title }}</title></rect>
{% if b.label %}<text class="bar-label" x="{{ b.x + 4 }}" y="{{ b.y + 12 }}">{{ b.label }}</text>{% endif %}
{% if b.marker %}<text class="marker" x="{{ b.x + b.w + 2 }}" y="{{ b.y + 12 }}">{{ b.marker }}</text>{% endif %}
</g>
{% endfor %}</svg>
<table id="modules">
<thead><tr><th>module</th><th>status</th><th>attempts</th><th>resource</th><th>waited s</th><th>run s</th><th>span s</th><th>worker</th><th>critical path</th>{% if not usage.empty %}<th>tokens</th><th>cost</th><th>LM cache</th>{% endif %}<th>error</th></tr></thead>
<tbody>
{% for row in rows %}<tr{% if row.critical %} class="critical"{% endif %}><td>{{ row.module }}</td><td class="status-{{ row.status }}">{{ row.status }}</td><td class="num">{{ row.attempts }}</td><td>{{ row.resource }}</td><td class="num">{{ row.waited }}</td><td class="num">{{ row.run }}</td><td class="num">{{ row.span }}</td><td>{{ row.workers }}</td><td>{% if row.critical %}&#9733;{% endif %}</td>{% if not usage.empty %}<td class="num">{{ row.lm.tokens }}</td><td class="num">{{ row.lm.cost }}</td><td class="num">{{ row.lm.cache }}</td>{% endif %}<td class="error">{% for error in row.errors %}<div>{{ error }}</div>{% endfor %}</td></tr>
{% endfor %}</tbody>
</table>
{% if r.compensations %}<h2>Compensations (in the order they ran)</h2>
<table id="compensations">
<thead><tr><th>module</th><th>status</th><th>attempts</th><th>worker</th><th>run s</th><th>error</th></tr></thead>
<tbody>
{% for name, c in r.compensations.items() %}<tr><td>{{ name }}</td><td class="status-{{ c.status.value }}">{{ c.status.value }}</td><td class="num">{{ c.attempts }}</td><td>{{ c.worker or "" }}</td><td class="num">{{ "%.3f" | format(c.duration_s) if c.duration_s is not none else "" }}</td><td class="error">{{ c.error or "" }}</td></tr>
{% endfor %}</tbody>
</table>{% endif %}
<p class="meta">critical path: {{ data.critical_path | join(" -> ") }} &#183; generated {{ data.generated_at.isoformat() }}</p>
</body>
</html>
"""

_ENV = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


def render_html(data: ReportData) -> str:
    """The report as one HTML document: no scripts, no external resources; every value escaped."""
    status_text, status_class = headline(data.result)
    return _ENV.from_string(_TEMPLATE).render(
        data=data, r=data.result, g=layout(data), rows=module_rows(data), markers=MARKERS, row_h=ROW_H,
        status_text=status_text, status_class=status_class, usage=total_usage(data.result.modules.values()),
    )
