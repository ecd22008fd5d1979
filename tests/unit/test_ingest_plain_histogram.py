"""PlainHistogram (the worker's per-message histograms) exposes what prometheus_client's
Histogram exposes for the same observations: the same bucket, sum and count samples."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from ingest_worker.metrics import IngestMetrics, PlainHistogram

BUCKETS = (0.001, 0.0025, 0.01, 0.5, 1, 10, 3600)


def _samples(registry: CollectorRegistry) -> list[str]:
    """The exposition's sample lines, without `_created` (PlainHistogram has none)."""
    text = generate_latest(registry).decode()
    return [line for line in text.splitlines() if line and "_created" not in line]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.floats(-10, 10_000, allow_nan=False),
            st.sampled_from([*BUCKETS, 0.0, -0.0, 1e-9, 3600.0000001, float("inf")]),
        ),
        max_size=40,
    )
)
def test_same_exposition_as_prometheus_histogram(values: list[float]) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    plain = PlainHistogram("x_seconds", "Help.", buckets=BUCKETS, registry=ours)
    reference = Histogram("x_seconds", "Help.", buckets=BUCKETS, registry=theirs)
    for v in values:
        plain.observe(v)
        reference.observe(v)
    assert _samples(ours) == _samples(theirs)


def test_the_worker_exposes_its_lag_histograms() -> None:
    metrics = IngestMetrics()
    metrics.lag_seconds.observe(0.003)
    metrics.publish_lag_seconds.observe(0.02)
    text = generate_latest(metrics.registry).decode()
    assert 'fieldline_ingest_lag_seconds_bucket{le="0.005"} 1.0' in text
    assert 'fieldline_ingest_lag_seconds_bucket{le="0.0025"} 0.0' in text
    assert "fieldline_ingest_publish_to_commit_seconds_count 1.0" in text
