"""Prometheus metrics of the embedded broker, in a registry of its own (one per broker)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


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
        self.messages_in = Counter(
            "fieldline_broker_messages_received_total",
            "PUBLISH packets received from clients.",
            registry=r,
        )
        self.messages_out = Counter(
            "fieldline_broker_messages_sent_total",
            "PUBLISH packets written to clients (resends included).",
            registry=r,
        )
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
