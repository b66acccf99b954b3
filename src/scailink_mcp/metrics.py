"""Prometheus metrics (`prometheus-client`), one registry per app so tests and workers never share state.

Counters and histograms are updated where things happen (`Metrics.call`); gauges of the pool, the
desktop sessions and the audit queue are read at scrape time from their owners.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import Response

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.calls = Counter(
            "scailink_tool_calls_total",
            "Tool calls by source and outcome",
            ["source", "outcome"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "scailink_tool_call_seconds",
            "Tool call latency",
            ["source"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._children: dict[tuple[str, str], tuple[Counter, Histogram]] = {}
        self.health_checks = Counter(
            "scailink_health_checks_total", "Health check results", ["result"], registry=self.registry
        )

    def gauge(self, name: str, doc: str, read: Callable[[], float]) -> None:
        """A gauge whose value is read from its owner at scrape time."""
        Gauge(name, doc, registry=self.registry).set_function(read)

    def call(self, source: str, outcome: str, seconds: float) -> None:
        # The labelled children are looked up once per (source, outcome): `labels()` validates and
        # locks on every call (~1.5 % of a warm call's CPU); the labels are a handful of fixed words.
        children = self._children.get((source, outcome))
        if children is None:
            children = (self.calls.labels(source=source, outcome=outcome), self.latency.labels(source=source))
            self._children[(source, outcome)] = children
        children[0].inc()
        children[1].observe(seconds)

    async def endpoint(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)
