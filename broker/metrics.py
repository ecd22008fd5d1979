"""Prometheus metrics of the embedded broker, in a registry of its own (one per broker)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from core.logs import LogSuppressedCollector

if TYPE_CHECKING:
    from broker.budget import MemoryBudget
    from broker.store import BrokerStore


class BrokerMetrics:
    """Connections, messages in and out, denials by reason, drops, subscriptions, the CRL."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.registry.register(LogSuppressedCollector())
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
            "Messages not delivered to a subscriber, by reason (queue-full, queue-bytes, "
            "offline-budget, offline-qos0, not-receivable).",
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
            "When the enforced CRL expires (renew by hand: `fieldline certs crl renew`).",
            registry=r,
        )
        self.disconnects = Counter(
            "fieldline_broker_disconnects_total",
            "Connections closed, by reason.",
            ["reason"],
            registry=r,
        )

        self.expired = Counter(
            "fieldline_broker_sessions_expired_total",
            "Offline persistent sessions deleted after broker.session_expiry_s.",
            registry=r,
        )

    def watch_store(self, store: BrokerStore) -> None:
        """Expose the durable store: commits, changes, errors, pending changes, bytes on disk."""
        self.registry.register(_StoreCollector(store))

    def watch_budget(self, budget: MemoryBudget) -> None:
        """Expose the memory budget: bytes held by pool, the limit, publishers paused."""
        self.registry.register(_BudgetCollector(budget))


class _BudgetCollector(Collector):
    def __init__(self, budget: MemoryBudget) -> None:
        self._budget = budget

    def collect(self) -> Iterator[Metric]:
        b = self._budget
        held = GaugeMetricFamily(
            "fieldline_broker_held_bytes",
            "Bytes of messages the broker holds for clients, by pool: connected (outboxes of "
            "connected sessions and PUBLISHes not yet routed), offline (persistent sessions "
            "away), socket (written, not yet read by the client).",
            labels=["pool"],
        )
        held.add_metric(["connected"], b.connected)
        held.add_metric(["offline"], b.offline)
        held.add_metric(["socket"], b.socket)
        yield held
        yield GaugeMetricFamily(
            "fieldline_broker_memory_budget_bytes",
            "broker.memory_budget_bytes: beyond it publishers are not read.",
            value=b.limit,
        )
        yield GaugeMetricFamily(
            "fieldline_broker_publishers_paused",
            "Connections not read now because the memory budget is spent.",
            value=b.paused,
        )
        yield CounterMetricFamily(
            "fieldline_broker_backpressure_pauses",
            "Times a publishing connection stopped being read because the budget was spent.",
            value=b.pauses,
        )


class _StoreCollector(Collector):
    def __init__(self, store: BrokerStore) -> None:
        self._store = store

    def collect(self) -> Iterator[Metric]:
        s = self._store
        yield CounterMetricFamily(
            "fieldline_broker_store_commits",
            "Transactions committed to the durable store (each holds a group of changes).",
            value=s.commits,
        )
        yield CounterMetricFamily(
            "fieldline_broker_store_changes",
            "Changes (messages queued or gone, sessions, subscriptions, retained) committed.",
            value=s.changes,
        )
        yield CounterMetricFamily(
            "fieldline_broker_store_commit_seconds",
            "Time spent committing to the durable store.",
            value=s.commit_seconds,
        )
        yield CounterMetricFamily(
            "fieldline_broker_store_errors",
            "Commits that failed (retried; acknowledgements wait meanwhile).",
            value=s.errors,
        )
        yield GaugeMetricFamily(
            "fieldline_broker_store_pending_changes",
            "Changes recorded and not yet committed.",
            value=s.pending,
        )
        yield GaugeMetricFamily(
            "fieldline_broker_store_bytes",
            "Size of the durable store on disk (database and write-ahead log).",
            value=s.size_bytes(),
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
