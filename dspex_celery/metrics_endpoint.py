"""``dspex-celery worker --metrics-port N``: a Prometheus endpoint on a worker.

Serves the module metrics every pool process of this worker records (:mod:`dspex_celery.metrics`,
prometheus_client's multiprocess mode) and, read from the state store at each scrape, the cluster's
breaker states and resource-slot use.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

from dspex_celery.errors import ConfigError
from dspex_celery.runtime import Runtime

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Breaker states as gauge values: what a dashboard colours.
BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}


def prepare_metrics_dir() -> str:
    """A fresh multiprocess directory for this worker (removed at exit); call before prometheus_client
    is imported, so the pool processes forked later write there."""
    path = tempfile.mkdtemp(prefix="dspex-metrics-")
    os.environ[MULTIPROC_ENV] = path
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def serve_metrics(runtime: Runtime, port: int, host: str = "127.0.0.1") -> None:
    """Install the metrics hook in ``runtime`` and serve ``/metrics`` on ``port`` from a daemon thread."""
    # Imported here, not at the top: prometheus_client picks its value store when first imported, and
    # the multiprocess directory (prepare_metrics_dir) must be set by then.
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    from dspex_celery.metrics import MetricsHook

    runtime.hooks.add(MetricsHook())
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    registry.register(ClusterStateCollector(runtime))
    try:
        start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on {host}:{port} ({exc.strerror or exc}): "
                          "pick a free --metrics-port (or DSPEX_METRICS_PORT)") from None


class ClusterStateCollector:
    """Breaker states and resource-slot use, read from the state store when scraped."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily  # see serve_metrics

        from dspex_celery.breaker import circuits
        from dspex_celery.resources import parse_limits, snapshot

        breakers = GaugeMetricFamily("dspex_breaker_state", "Circuit state per PROGRAM.MODULE: 0 closed, "
                                     "1 half-open, 2 open.", labels=["breaker"])
        failures = GaugeMetricFamily("dspex_breaker_failures", "Failures counted by a circuit.", labels=["breaker"])
        in_use = GaugeMetricFamily("dspex_resource_slots_in_use", "Resource-class slots held now.",
                                   labels=["resource"])
        limit = GaugeMetricFamily("dspex_resource_slot_limit", "A resource class's concurrency limit now "
                                  "(lowered after 429s).", labels=["resource"])
        try:
            store = self.runtime.store
            for circuit in circuits(store):
                breakers.add_metric([circuit["name"]], BREAKER_STATES.get(circuit["state"], 0))
                failures.add_metric([circuit["name"]], circuit["failures"])
            for row in snapshot(store, parse_limits(self.runtime.settings.resources)):
                in_use.add_metric([row["resource"]], row["in_use"])
                current = (row.get("adaptive") or {}).get("limit", row["max_concurrent"])
                if current:
                    limit.add_metric([row["resource"]], current)
        except Exception as exc:  # a store that does not answer: serve the module metrics anyway
            log.warning("metrics: cannot read breakers and resource slots from the state store (%s)", exc)
        yield from (breakers, failures, in_use, limit)
