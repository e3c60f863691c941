"""OpenTelemetry traces: one trace per execution, one child span per module call.

Off unless the process has an OpenTelemetry SDK ``TracerProvider`` installed (the API alone is a
no-op). The client opens the execution's span around its submission and stores the W3C trace
context in the execution's meta; every worker reads it back (the meta arrives with the module's
begin step, so no message header is needed, whichever path dispatched the module) and opens the
module call's span as its child. Attributes: program, module, attempt, worker, resource class,
status, tokens when the module recorded them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from dspex_celery.hooks import Hook, ModuleContext
from dspex_celery.results import ModuleRecord
from dspex_celery.settings import Settings

#: The instrumentation scope of every span this package opens.
TRACER_NAME = "dspex_celery"
#: Record fields copied onto a module span when a module recorded them (LM usage).
TOKEN_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens", "cost")

_propagator = TraceContextTextMapPropagator()


def tracing_enabled() -> bool:
    """True when an OpenTelemetry SDK (not the API's default no-op provider) is installed."""
    provider = trace.get_tracer_provider()
    return not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)


def _tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


@contextlib.contextmanager
def execution_span(program: str, execution_id: str, strategy: str) -> Iterator[dict[str, str] | None]:
    """The execution's root span around its submission; yields the trace context to store in the
    meta (None when tracing is off)."""
    if not tracing_enabled():
        yield None
        return
    attributes = {"dspex.program": program, "dspex.execution_id": execution_id, "dspex.strategy": strategy}
    with _tracer().start_as_current_span(f"dspex.execution {program}", kind=SpanKind.PRODUCER,
                                         attributes=attributes):
        carrier: dict[str, str] = {}
        _propagator.inject(carrier)
        yield carrier


class TracingHook(Hook):
    """Opens a span per module attempt, child of the execution's span; ends it with the outcome."""

    def before_module(self, ctx: ModuleContext) -> None:
        if not tracing_enabled():
            return
        carrier = (ctx.extras.get("meta") or {}).get("trace") or {}
        parent = _propagator.extract(carrier) if carrier else None
        attributes: dict[str, Any] = {
            "dspex.program": ctx.plan.program,
            "dspex.execution_id": ctx.execution_id,
            "dspex.module": ctx.module.name,
            "dspex.attempt": ctx.attempt,
            "dspex.worker": ctx.worker,
            "dspex.resource": ctx.module.resource,
        }
        ctx.extras["span"] = _tracer().start_span(f"dspex.module {ctx.module.name}", context=parent,
                                                  kind=SpanKind.CONSUMER, attributes=attributes)

    def after_success(self, ctx: ModuleContext, output: dict[str, Any]) -> None:
        span = ctx.extras.pop("span", None)
        if span is not None:
            _end(span, ctx.record, Status(StatusCode.OK))

    def after_failure(self, ctx: ModuleContext, error: BaseException, will_retry: bool) -> None:
        span = ctx.extras.pop("span", None)
        if span is None:
            return
        span.record_exception(error)
        span.set_attribute("dspex.will_retry", will_retry)
        _end(span, ctx.record, Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"[:200]))


def _end(span: Span, record: ModuleRecord, status: Status) -> None:
    span.set_attribute("dspex.status", record.status.value)
    extra = record.model_extra or {}
    for name in TOKEN_FIELDS:
        value = getattr(record, name, None) if name in type(record).model_fields else extra.get(name)
        if isinstance(value, int | float):
            span.set_attribute(f"dspex.{name}", value)
    span.set_status(status)
    span.end()


def tracing_hooks(settings: Settings) -> list[Hook]:
    """The tracing hook; it does nothing until an OpenTelemetry SDK is configured in the process."""
    return [TracingHook()]
