"""Prometheus metrics of an ingest worker, in a registry of its own."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from core.logs import LogSuppressedCollector


class IngestMetrics:
    """Messages in, rows written, batches, commit latency, queue depth, dead letters, lag."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.registry.register(LogSuppressedCollector())
        r = self.registry
        # per-message values are plain numbers read at scrape time (no lock per message)
        self.received = 0
        self.pending = 0
        self.pending_bytes = 0
        self.connected = 0
        self.last_commit = 0.0
        self.nats_ack_pending = 0  # pulled from JetStream, not yet acknowledged
        self.nats_backlog = 0  # in the consumer, not delivered yet (as of the last pull)
        self.nats_stream_bytes = 0  # what the consumed stream holds (per replica), polled
        self.nats_stream_messages = 0
        self.nats_store_budget = 0  # what it may hold before something gives (0: not nats)
        self.nats_stranded = 0  # below the consumer's ack floor at two polls in a row
        r.register(_Live(self))
        self.rows = Counter(
            "fieldline_ingest_rows_written_total",
            "Rows committed, by table.",
            ["table"],
            registry=r,
        )
        self.dead_letters = Counter(
            "fieldline_ingest_dead_letters_total",
            "Messages acknowledged into fieldline.dead_letters, by reason.",
            ["reason"],
            registry=r,
        )
        self.dead_letters_suppressed = Counter(
            "fieldline_ingest_dead_letters_suppressed_total",
            "Refused messages past their device's dead-letter budget: counted, not stored.",
            ["reason"],
            registry=r,
        )
        self.conflicts = Counter(
            "fieldline_ingest_conflicting_readings_total",
            "Readings sent for a (metric, time) already stored with another value (not stored).",
            registry=r,
        )
        self.batch_rows = Histogram(
            "fieldline_ingest_batch_rows",
            "Rows per batch handed to a writer.",
            buckets=(1, 10, 100, 500, 1000, 2000, 5000, 10000, 20000, 50000),
            registry=r,
        )
        self.commit_seconds = Histogram(
            "fieldline_ingest_commit_seconds",
            "Time to write and commit one batch.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        # The two per-message histograms: plain counts (see PlainHistogram).
        self.lag_seconds = PlainHistogram(
            "fieldline_ingest_lag_seconds",
            "From a message's receipt by the worker to the commit of its rows.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.publish_lag_seconds = PlainHistogram(
            "fieldline_ingest_publish_to_commit_seconds",
            "From the device's `ts` to the commit (includes clock skew and device buffering).",
            buckets=(
                0.002,
                0.005,
                0.01,
                0.015,
                0.02,
                0.025,
                0.03,
                0.04,
                0.05,
                0.075,
                0.1,
                0.25,
                0.5,
                1,
                2.5,
                5,
                10,
                60,
                600,
                # a worker behind by half the broker's queue (FieldlineIngestBrokerQueueHalfFull)
                1800,
                3600,
                7200,
            ),
            registry=r,
        )
        self.retries = Counter(
            "fieldline_ingest_db_retries_total",
            "Batches retried after a transient database error.",
            registry=r,
        )
        self.batch_failures = Counter(
            "fieldline_ingest_batch_failures_total",
            "Tries of a batch (or part) that failed for a reason of its own, not the "
            "connection: transient (retried, then split) or permanent (split), by SQLSTATE.",
            ["failure", "sqlstate"],
            registry=r,
        )
        self.batch_splits = Counter(
            "fieldline_ingest_batch_splits_total",
            "Failing batches split in halves to isolate the messages the database refuses.",
            registry=r,
        )
        self.pauses = Counter(
            "fieldline_ingest_receive_pauses_total",
            "Times the worker stopped reading from the broker, by the bound its queue reached "
            "(ingest.queue_max: messages, queue_max_rows: rows, queue_max_bytes: bytes).",
            ["bound"],
            registry=r,
        )
        self.seq_gaps = Counter(
            "fieldline_ingest_seq_gaps_total",
            "Messages missing by the devices' `seq` counters: holes in the committed sequence "
            "older than ingest.seq_reorder_window_s or further back than ingest.seq_reorder_span "
            "(a reordering between writers or workers is not counted).",
            registry=r,
        )
        self.seq_gaps_forced = Counter(
            "fieldline_ingest_seq_gaps_forced_total",
            "Of those, the ones counted before their time because a device's holes reached "
            "ingest.seq_reorder_span numbers (may count a very late reordering as loss).",
            registry=r,
        )
        self.presence = Counter(
            "fieldline_ingest_presence_transitions_total",
            "Device presence changes written as events, by new state.",
            ["to"],
            registry=r,
        )
        self.reconnects = Counter(
            "fieldline_ingest_broker_connects_total",
            "Connections made to the broker (the first one and every reconnect).",
            registry=r,
        )
        self.retention_runs = Counter(
            "fieldline_ingest_retention_runs_total",
            "Retention passes, by result.",
            ["result"],
            registry=r,
        )
        self.compacted_rows = Counter(
            "fieldline_ingest_compacted_rows_total",
            "Hot numeric rows moved into packed rows by compaction.",
            registry=r,
        )
        self.compacted_buckets = Counter(
            "fieldline_ingest_compacted_buckets_total",
            "Packed rows (a metric's day or hour) written by compaction, new or merged.",
            registry=r,
        )
        self.compaction_seconds = Histogram(
            "fieldline_ingest_compaction_seconds",
            "Time one compaction pass took (all tenants of a database).",
            buckets=(0.01, 0.1, 0.5, 1, 2.5, 5, 10, 20, 30, 60),
            registry=r,
        )
        self.compaction_runs = Counter(
            "fieldline_ingest_compaction_runs_total",
            "Compaction passes, by result: ok, partial (stopped by storage.compact_budget_s "
            "with rows left), failed.",
            ["result"],
            registry=r,
        )
        self.redelivered = Counter(
            "fieldline_ingest_redelivered_total",
            "Messages JetStream delivered again (not acknowledged within ingest.nats_ack_wait_s, "
            "or their worker died); written idempotently, so counted, not duplicated.",
            registry=r,
        )
        self.ack_pending_full = Counter(
            "fieldline_ingest_ack_pending_full_total",
            "Times the worker stopped pulling from JetStream because ingest.nats_max_ack_pending "
            "of its messages were unacknowledged.",
            registry=r,
        )
        self.nats_skipped = Counter(
            "fieldline_ingest_nats_skipped_total",
            "Messages of the consumed JetStream stream that are not the service's (commands "
            "to devices, published QoS 1 by operators): acknowledged and not ingested.",
            registry=r,
        )
        self.nats_consumer_lost = Counter(
            "fieldline_ingest_nats_consumer_lost_total",
            "Times the worker found its JetStream consumer (or its stream) gone and connected "
            "again to recreate it (interest retention drops what arrives in between).",
            registry=r,
        )
        self.nats_pull_bounded = Counter(
            "fieldline_ingest_nats_pull_bounded_total",
            "Full pulls that asked for fewer messages than ingest.nats_fetch_batch so that one "
            "pull of messages of the server's largest size stays within "
            "ingest.nats_fetch_max_bytes.",
            registry=r,
        )
        self.nats_orphan_consumers = Counter(
            "fieldline_ingest_nats_orphan_consumers_total",
            "Other pull consumers of fl.> found on $MQTT_msgs when connecting (a renamed "
            "ingest.nats_consumer or a switched ingest.nats_stream): the stream keeps every "
            "message for them.",
            registry=r,
        )
        self.up = Gauge("fieldline_ingest_up", "1 while the worker runs.", registry=r)


class PlainHistogram(Collector):
    """A histogram observed once per message: bucket counts in a plain list, read at scrape
    time. prometheus_client's Histogram takes a lock for the sum and one for the bucket on
    every observe; the worker observes from its event loop thread only."""

    def __init__(
        self,
        name: str,
        documentation: str,
        *,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self.name, self.documentation = name, documentation
        self._bounds = tuple(sorted(float(b) for b in buckets))
        self._counts = [0] * (len(self._bounds) + 1)  # the last one is +Inf
        self._sum = 0.0
        registry.register(self)

    def observe(self, amount: float) -> None:
        """Count one value, into the first bucket whose bound is >= it (`le`)."""
        self._counts[bisect_left(self._bounds, amount)] += 1
        self._sum += amount

    def collect(self) -> Iterator[HistogramMetricFamily]:
        counts, total = list(self._counts), self._sum
        buckets, cumulative = [], 0
        for bound, n in zip((*self._bounds, float("inf")), counts, strict=True):
            cumulative += n
            buckets.append((floatToGoString(bound), float(cumulative)))  # type: ignore[no-untyped-call]
        yield HistogramMetricFamily(self.name, self.documentation, buckets=buckets, sum_value=total)


class _Live(Collector):
    def __init__(self, metrics: IngestMetrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        m = self._m
        yield CounterMetricFamily(
            "fieldline_ingest_messages_received",
            "Messages received from the broker (redeliveries included).",
            value=m.received,
        )
        yield GaugeMetricFamily(
            "fieldline_ingest_queue_depth",
            "Messages received and not yet acknowledged (the worker's queue).",
            value=m.pending,
        )
        yield GaugeMetricFamily(
            "fieldline_ingest_queue_bytes",
            "Payload bytes of the messages received and not yet acknowledged.",
            value=m.pending_bytes,
        )
        yield GaugeMetricFamily(
            "fieldline_ingest_acks_pending",
            "Messages whose rows are not committed yet, so not acknowledged to the broker.",
            value=m.pending,
        )
        yield GaugeMetricFamily(
            "fieldline_ingest_nats_ack_pending",
            "Messages this worker pulled from JetStream and has not acknowledged yet "
            "(0 with the mqtt source).",
            value=m.nats_ack_pending,
        )
        yield GaugeMetricFamily(
            "fieldline_ingest_nats_backlog",
            "Messages in the JetStream consumer not delivered to any worker yet, as of this "
            "worker's last pull (what $MQTT_msgs holds for the workers; 0 with the mqtt source).",
            value=m.nats_backlog,
        )
        yield GaugeMetricFamily(
            "fieldline_ingest_nats_stream_bytes",
            "Bytes the consumed JetStream stream holds on each of its replicas, polled every "
            "10 s (0 with the mqtt source).",
            value=m.nats_stream_bytes,
        )
        yield GaugeMetricFamily(
            "fieldline_ingest_nats_stream_messages",
            "Messages the consumed JetStream stream holds, polled every 10 s.",
            value=m.nats_stream_messages,
        )
        yield GaugeMetricFamily(
            "fieldline_ingest_nats_stream_budget_bytes",
            "What the consumed stream may hold on a node before something gives: for "
            "$MQTT_msgs nats.max_store_bytes less nats.stream_max_bytes (then nats-server "
            "refuses MQTT), for FIELDLINE nats.stream_max_bytes (then its oldest are dropped); "
            "0 with the mqtt source.",
            value=m.nats_store_budget,
        )
        yield GaugeMetricFamily(
            "fieldline_ingest_nats_stranded_messages",
            "At most this many messages of $MQTT_msgs lie below the ingest consumer's "
            "acknowledgement floor at two polls in a row: kept, and never to be delivered "
            "(docs/broker.md, a consumer ahead of its stream); 0 when none, or when other "
            "consumers share the stream.",
            value=m.nats_stranded,
        )
        yield GaugeMetricFamily(
            "fieldline_ingest_broker_connected",
            "1 while connected to the broker.",
            value=m.connected,
        )
        yield GaugeMetricFamily(
            "fieldline_ingest_last_commit_timestamp_seconds",
            "When the last batch committed (Unix time; 0 before the first).",
            value=m.last_commit,
        )
