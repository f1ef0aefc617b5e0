"""Prometheus metrics, declared once, with units in names and low-cardinality labels.

Each app gets its own :class:`~prometheus_client.CollectorRegistry` so tests
are isolated. With several worker processes, prometheus-client's multiprocess
mode (``PROMETHEUS_MULTIPROC_DIR``, set by the supervisor before the workers
start) sums every worker's values in ``/metrics``.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("edgecache_requests", "Requests answered, by route pattern and status",
                                ["route", "method", "status"], registry=r)
        self.request_seconds = Histogram("edgecache_request_duration_seconds", "Time to answer (headers and body)",
                                         ["route"], buckets=_LATENCY, registry=r)
        self.in_progress = Gauge("edgecache_requests_in_progress", "Requests being answered", registry=r,
                                 multiprocess_mode="livesum")
        self.outcomes = Counter("edgecache_cache_outcomes", "Cache outcome of /v2/ content requests",
                                ["outcome"], registry=r)
        self.served_bytes = Counter("edgecache_served_bytes", "Body bytes sent to clients, by source",
                                    ["source"], registry=r)
        self.upstream_requests = Counter("edgecache_upstream_requests", "Requests sent upstream",
                                         ["upstream", "method", "status"], registry=r)
        self.upstream_seconds = Histogram("edgecache_upstream_request_duration_seconds",
                                          "Upstream time to response headers", ["upstream"], buckets=_LATENCY, registry=r)
        self.upstream_errors = Counter("edgecache_upstream_errors", "Upstream transport failures",
                                       ["upstream", "kind"], registry=r)
        self.upstream_bytes = Counter("edgecache_upstream_bytes", "Body bytes received from upstream",
                                      ["upstream"], registry=r)
        self.flights = Gauge("edgecache_flights_in_progress", "Downloads in progress", registry=r,
                             multiprocess_mode="livesum")
        self.cache_bytes = Gauge("edgecache_cache_bytes", "Bytes stored in the cache", registry=r,
                                 multiprocess_mode="max")
        self.evictions = Counter("edgecache_cache_evictions", "Entries evicted by LRU", registry=r)
        self.evicted_bytes = Counter("edgecache_cache_evicted_bytes", "Bytes evicted by LRU", registry=r)
        self.ratelimit_remaining = Gauge("edgecache_upstream_ratelimit_remaining",
                                         "Last ratelimit-remaining header seen", ["upstream"], registry=r,
                                         multiprocess_mode="min")
        self._outcomes: dict[str, Any] = {}
        self._served: dict[str, Any] = {}
        self.warm_images = Counter("edgecache_replication_images", "Images pre-warmed by replication lists",
                                   ["status"], registry=r)

    def outcome(self, value: str) -> Any:
        """The counter child for an X-Cache outcome (labels() is slow on the hot path: cache children)."""
        child = self._outcomes.get(value)
        if child is None:
            child = self._outcomes[value] = self.outcomes.labels(value.lower())
        return child

    def served(self, source: str) -> Any:
        child = self._served.get(source)
        if child is None:
            child = self._served[source] = self.served_bytes.labels(source)
        return child

    def on_upstream(self, upstream: str, method: str, status: int | None, seconds: float, error: str | None) -> None:
        if status is not None:
            self.upstream_requests.labels(upstream, method, str(status)).inc()
            self.upstream_seconds.labels(upstream).observe(seconds)
        if error is not None:
            self.upstream_errors.labels(upstream, error).inc()

    def render(self) -> bytes:
        if self.multiprocess:
            collector = CollectorRegistry()
            multiprocess.MultiProcessCollector(collector)  # type: ignore[no-untyped-call]
            return generate_latest(collector)
        return generate_latest(self.registry)
