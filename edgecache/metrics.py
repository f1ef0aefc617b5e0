"""Prometheus metrics, declared once, with units in names and low-cardinality labels.

Per-request figures (requests, latency, cache outcomes, served bytes, requests in
progress) are counted in plain dicts on the hot path and applied to the
prometheus objects by :meth:`Metrics.flush` (on every scrape, and every
``FLUSH_SECONDS`` by the app): a prometheus-client update takes a lock (or an
mmap write in multiprocess mode) per call, and five of them per request cost
more than the rest of a cached manifest answer.

Each app gets its own :class:`~prometheus_client.CollectorRegistry` so tests
are isolated. With several worker processes, prometheus-client's multiprocess
mode (``PROMETHEUS_MULTIPROC_DIR``, set by the supervisor before the workers
start) sums every worker's values in ``/metrics``.
"""

from __future__ import annotations

import bisect
import os
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess

FLUSH_SECONDS = 0.5
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
        self.open_blob_files = Gauge("edgecache_open_blob_files",
                                     "Descriptors of hot blobs kept open (cache.open_files)", registry=r,
                                     multiprocess_mode="livesum")
        self.evictions = Counter("edgecache_cache_evictions", "Entries evicted by LRU", registry=r)
        self.evicted_bytes = Counter("edgecache_cache_evicted_bytes", "Bytes evicted by LRU", registry=r)
        self.ratelimit_remaining = Gauge("edgecache_upstream_ratelimit_remaining",
                                         "Last ratelimit-remaining header seen", ["upstream"], registry=r,
                                         multiprocess_mode="min")
        self._outcomes: dict[str, Any] = {}
        self._served: dict[str, Any] = {}
        # Pending per-request figures, applied by flush().
        self.active = 0  # requests being answered right now
        self._requests: dict[tuple[str, str, int], int] = {}
        self._latency: dict[str, list[float]] = {}  # route -> [count per bucket..., sum]
        self._pending_outcomes: dict[str, int] = {}
        self._pending_served: dict[str, int] = {}
        self._bounds = _LATENCY
        if not self.multiprocess:  # one process: the gauge reads the live figure at scrape time
            self.in_progress.set_function(lambda: self.active)
        self.warm_images = Counter("edgecache_replication_images", "Images pre-warmed by replication lists",
                                   ["status"], registry=r)

    # hot path: plain dict updates ------------------------------------------------
    def request_done(self, route: str, method: str, status: int, seconds: float, outcome: str | None) -> None:
        """One answered request (``outcome``: its X-Cache value, for content requests that succeeded)."""
        key = (route, method, status)
        self._requests[key] = self._requests.get(key, 0) + 1
        hist = self._latency.get(route)
        if hist is None:
            hist = self._latency[route] = [0.0] * (len(self._bounds) + 2)
        hist[bisect.bisect_left(self._bounds, seconds)] += 1  # index len(bounds) is +Inf
        hist[-1] += seconds
        if outcome is not None:
            self._pending_outcomes[outcome] = self._pending_outcomes.get(outcome, 0) + 1

    def served(self, source: str, n: int) -> None:
        """Body bytes sent to a client from ``source`` (cache or upstream)."""
        self._pending_served[source] = self._pending_served.get(source, 0) + n

    def flush(self) -> None:
        """Apply the pending per-request figures to the prometheus objects."""
        if self.multiprocess:
            self.in_progress.set(self.active)
        requests, self._requests = self._requests, {}
        latency, self._latency = self._latency, {}
        outcomes, self._pending_outcomes = self._pending_outcomes, {}
        served, self._pending_served = self._pending_served, {}
        for (route, method, status), n in requests.items():
            self.requests.labels(route, method, str(status)).inc(n)
        for route, hist in latency.items():
            h = self.request_seconds.labels(route)
            # Histogram.observe() adds one observation; apply a batch to the same values it updates.
            for i, count in enumerate(hist[:-1]):
                if count:
                    h._buckets[i].inc(count)  # noqa: SLF001
            h._sum.inc(hist[-1])  # noqa: SLF001
        for outcome, n in outcomes.items():
            c = self._outcomes.get(outcome)
            if c is None:
                c = self._outcomes[outcome] = self.outcomes.labels(outcome.lower())
            c.inc(n)
        for source, n in served.items():
            c = self._served.get(source)
            if c is None:
                c = self._served[source] = self.served_bytes.labels(source)
            c.inc(n)

    def on_upstream(self, upstream: str, method: str, status: int | None, seconds: float, error: str | None) -> None:
        if status is not None:
            self.upstream_requests.labels(upstream, method, str(status)).inc()
            self.upstream_seconds.labels(upstream).observe(seconds)
        if error is not None:
            self.upstream_errors.labels(upstream, error).inc()

    def render(self) -> bytes:
        """The exposition text (call :meth:`flush` first, on the event loop)."""
        if self.multiprocess:
            collector = CollectorRegistry()
            multiprocess.MultiProcessCollector(collector)  # type: ignore[no-untyped-call]
            return generate_latest(collector)
        return generate_latest(self.registry)
