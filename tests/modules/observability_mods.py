"""OpenTelemetry set-up for the observability tests: spans of every process go to one JSON-lines file.

Imported by a worker (``--include tests.modules.observability_mods``) and by the client script
(``python -m tests.modules.observability_mods PROGRAM_JSON``), with ``DSPEX_TEST_SPANS_FILE`` set.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

SPANS_FILE_ENV = "DSPEX_TEST_SPANS_FILE"


class JsonLinesExporter(SpanExporter):
    """Appends one JSON line per finished span (O_APPEND: the pool processes share the file)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(json.dumps(_as_dict(span)) + "\n" for span in spans)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, lines.encode())
        finally:
            os.close(fd)
        return SpanExportResult.SUCCESS


def _as_dict(span: ReadableSpan) -> dict[str, object]:
    context = span.get_span_context()
    return {
        "name": span.name,
        "trace_id": f"{context.trace_id:032x}",
        "span_id": f"{context.span_id:016x}",
        "parent_id": f"{span.parent.span_id:016x}" if span.parent else None,
        "attributes": dict(span.attributes or {}),
        "status": span.status.status_code.name,
        "pid": os.getpid(),
    }


def install() -> None:
    """An SDK tracer provider exporting to ``$DSPEX_TEST_SPANS_FILE`` (nothing when unset)."""
    path = os.environ.get(SPANS_FILE_ENV)
    if path:
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(path)))
        trace.set_tracer_provider(provider)


install()


def main(argv: list[str]) -> None:
    """Client: run the program given as JSON on the cluster of the environment, print the execution id."""
    from dspex_celery.client import submit_program

    handle = submit_program(json.loads(argv[0]), {})
    handle.get(timeout=60)
    print(handle.execution_id)


if __name__ == "__main__":
    main(sys.argv[1:])
