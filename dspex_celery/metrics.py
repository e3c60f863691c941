"""Prometheus metrics of module calls, recorded by a hook on the workers.

``dspex-celery worker --metrics-port N`` installs :class:`MetricsHook` and serves the metrics
(``dspex_celery.metrics_endpoint``). Prefork pool processes write to prometheus_client's
multiprocess files, so ``PROMETHEUS_MULTIPROC_DIR`` must be set before this module is imported.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Histogram

from dspex_celery.hooks import Hook, ModuleContext
from dspex_celery.results import ModuleStatus, parse_time

#: Buckets (seconds) for module durations and queue waits: LM calls take 0.1 s to minutes.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)

MODULE_LABELS = ("program", "module", "resource")

MODULE_DURATION = Histogram("dspex_module_duration_seconds", "Duration of one module attempt.",
                            [*MODULE_LABELS, "status"], buckets=BUCKETS)
ATTEMPTS = Counter("dspex_module_attempts_total", "Module attempts by outcome (succeeded, failed, retrying).",
                   [*MODULE_LABELS, "outcome"])
FAILURES = Counter("dspex_module_failures_total", "Module attempts that ended with an error.",
                   [*MODULE_LABELS, "error"])
QUEUE_WAIT = Histogram("dspex_queue_wait_seconds",
                       "From the moment a module could run (its parents done, or the submission) to its "
                       "first attempt's start.", ["resource"], buckets=BUCKETS)
SLOT_WAIT = Histogram("dspex_resource_slot_wait_seconds", "Time a module waited for a resource-class slot.",
                      ["resource"], buckets=BUCKETS)


def _labels(ctx: ModuleContext) -> dict[str, str]:
    return {"program": ctx.plan.program, "module": ctx.module.name, "resource": ctx.module.resource}


class MetricsHook(Hook):
    """Counts attempts, failures and durations; observes queue and slot waits."""

    def before_module(self, ctx: ModuleContext) -> None:
        if ctx.attempt == 1:
            wait = _queue_wait(ctx)
            if wait is not None:
                QUEUE_WAIT.labels(resource=ctx.module.resource).observe(wait)

    def after_success(self, ctx: ModuleContext, output: dict[str, Any]) -> None:
        self._finished(ctx, "succeeded")

    def after_failure(self, ctx: ModuleContext, error: BaseException, will_retry: bool) -> None:
        if not isinstance(error, Exception):  # terminated (cancel, shutdown): not a module failure
            return
        FAILURES.labels(**_labels(ctx), error=type(error).__name__).inc()
        self._finished(ctx, "retrying" if will_retry else "failed")

    def _finished(self, ctx: ModuleContext, outcome: str) -> None:
        record = ctx.record
        ATTEMPTS.labels(**_labels(ctx), outcome=outcome).inc()
        if record.duration_s is not None:
            MODULE_DURATION.labels(**_labels(ctx), status=outcome).observe(record.duration_s)
        if record.waited_s:
            SLOT_WAIT.labels(resource=ctx.module.resource).observe(record.waited_s)


def _queue_wait(ctx: ModuleContext) -> float | None:
    """Seconds from the latest of submission and the parents' finish to this attempt's start."""
    meta = ctx.extras.get("meta") or {}
    moments = [meta["submitted_at"]] if meta.get("submitted_at") else []
    if ctx.module.parents:
        records = ctx.runtime.store.records_of(ctx.execution_id, ctx.module.parents)
        moments += [record.finished_at for record in records.values()
                    if record.finished_at and record.status is ModuleStatus.SUCCEEDED]
    if not moments:
        return None
    ready = max(parse_time(moment) for moment in moments)
    return max(0.0, (ctx.started_at - ready).total_seconds())
