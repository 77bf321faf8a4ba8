"""Prometheus metrics: request latency histograms and counts by route, method and status.

Each process counts its own requests (one registry per app); with several workers, scrape
each, or run them with prometheus_client's multiprocess mode.
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client import generate_latest as _render
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """The service's counters, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ("method", "route", "status")
        self.latency = Histogram(
            "memlayer_http_request_duration_seconds",
            "Time to answer a request, by route template",
            labels,
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.requests = Counter(
            "memlayer_http_requests", "Requests answered", labels, registry=self.registry
        )

    def render(self, _: Request) -> Response:
        """The /metrics page (Prometheus text format)."""
        return Response(_render(self.registry), media_type=CONTENT_TYPE_LATEST)


class MeasureRequests:
    """ASGI middleware: time each request and count it by its route template (never the raw
    path, whose ids would make the label set grow without bound)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def sent(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sent)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            labels = (scope["method"], route, str(status))
            self.metrics.latency.labels(*labels).observe(time.perf_counter() - started)
            self.metrics.requests.labels(*labels).inc()
