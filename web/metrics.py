"""The web server's Prometheus metrics, in a registry of its own (one per app)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from core.logs import LogSuppressedCollector


class WebMetrics:
    """Requests, refusals (each bound that bit), open streams and commands sent."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(LogSuppressedCollector())
        self.requests = Counter(
            "fieldline_web_requests_total", "HTTP requests answered, by route and status",
            ["route", "status"], registry=self.registry,
        )  # fmt: skip
        self.seconds = Histogram(
            "fieldline_web_request_seconds", "Time to answer a request, by route",
            ["route"], registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
        )  # fmt: skip
        self.refused = Counter(
            "fieldline_web_refused_total",
            "Requests refused by a bound or by auth: rate_limited, body_too_large, "
            "too_many_streams, points_limit, limit_limit, unauthorized, auth_failures, forbidden, "
            "slow_request",
            ["reason"], registry=self.registry,
        )  # fmt: skip
        self.streams = Gauge(
            "fieldline_web_streams_open", "Live streams (server-sent events) open",
            registry=self.registry,
        )  # fmt: skip
        self.truncated = Counter(
            "fieldline_web_truncated_total",
            "Values cut short in answers, by what: event_body (web.max_event_body_bytes)",
            ["what"], registry=self.registry,
        )  # fmt: skip
        self.commands = Counter(
            "fieldline_web_commands_total",
            "Commands sent through the API, by outcome: sent, no_certificate, broker_failed",
            ["outcome"], registry=self.registry,
        )  # fmt: skip
