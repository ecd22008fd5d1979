"""Prometheus metrics of the embedded broker, in a registry of its own (one per broker)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector


class BrokerMetrics:
    """Connections, messages in and out, denials by reason, drops, subscriptions, the CRL."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.connected = Gauge(
            "fieldline_broker_connected_clients", "Clients connected now.", registry=r
        )
        self.connects = Counter(
            "fieldline_broker_connects_total",
            "CONNECT attempts by result (accepted, or the reason for refusing).",
            ["result"],
            registry=r,
        )
        # the per-message counters are plain ints, read at scrape time: a prometheus Counter
        # costs a lock and checks on every increment of the broker's hottest path
        self.received = 0
        self.sent = 0
        r.register(_MessageCounters(self))
        self.denials = Counter(
            "fieldline_broker_denials_total",
            "Operations refused by the ACL policy, by action and rule.",
            ["action", "reason"],
            registry=r,
        )
        self.dropped = Counter(
            "fieldline_broker_dropped_total",
            "Messages not delivered to a subscriber, by reason.",
            ["reason"],
            registry=r,
        )
        self.subscriptions = Gauge(
            "fieldline_broker_subscriptions", "Subscription filters held.", registry=r
        )
        self.sessions = Gauge(
            "fieldline_broker_sessions", "Sessions held, connected or not.", registry=r
        )
        self.retained = Gauge(
            "fieldline_broker_retained_messages", "Retained messages held.", registry=r
        )
        self.revoked = Gauge(
            "fieldline_broker_crl_revoked_certificates",
            "Serials in the CRL the broker enforces.",
            registry=r,
        )
        self.crl_next_update = Gauge(
            "fieldline_broker_crl_next_update_timestamp_seconds",
            "When the enforced CRL expires (regenerate it before: `fieldline certs crl`).",
            registry=r,
        )
        self.disconnects = Counter(
            "fieldline_broker_disconnects_total",
            "Connections closed, by reason.",
            ["reason"],
            registry=r,
        )


class _MessageCounters(Collector):
    def __init__(self, metrics: BrokerMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(
            "fieldline_broker_messages_received",
            "PUBLISH packets received from clients.",
            value=self._metrics.received,
        )
        yield CounterMetricFamily(
            "fieldline_broker_messages_sent",
            "PUBLISH packets written to clients (resends included).",
            value=self._metrics.sent,
        )
