"""Every metric the Grafana dashboard queries is exposed by a running fieldline service.

Starts the embedded broker, an ingest worker (a real `fieldline ingest run` process with
TimescaleDB) and an edge agent, makes a little traffic of every kind the dashboard plots (so
labelled series exist: a denial, a dead letter, a presence change, a dropped message, a rule
firing), scrapes the three /metrics endpoints and compares sample names.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from core.pgcluster import free_port
from edge_agent.agent import AgentOptions, EdgeAgent
from edge_agent.manifest import load_manifest
from tests.fixtures.brokers import BrokerUnderTest
from tests.fixtures.edge import MACHINE_RESET, manifest_text, write_manifest
from tests.fixtures.ingest import burst, start_worker
from tests.metrics_text import sample_names
from tests.mqtt_raw import RawClient

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "fieldline.json"
# every fieldline metric starts with this; PromQL functions and labels never do
_METRIC = re.compile(r"\bfieldline_[a-z0-9_]+\b")


def dashboard_exprs() -> list[str]:
    """Every PromQL expression of every panel (rows included) in the dashboard."""
    data = json.loads(DASHBOARD.read_text())

    def walk(panels: list[dict[str, object]]) -> list[str]:
        found: list[str] = []
        for panel in panels:
            for target in panel.get("targets", []):  # type: ignore[attr-defined]
                found.append(str(target["expr"]))
            found.extend(walk(panel.get("panels", [])))  # type: ignore[arg-type]
        return found

    return walk(data["panels"])


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects, as they appear in the exposition."""
    return set(_METRIC.findall(expr))


def missing_from(exprs: list[str], exposed: set[str]) -> dict[str, set[str]]:
    """expr -> the names it queries that no service exposes."""
    gaps = {e: metric_names(e) - exposed for e in exprs}
    return {e: names for e, names in gaps.items() if names}


def test_the_name_extraction_sees_suffixes_and_ignores_promql() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le) "
        '(rate(fieldline_ingest_lag_seconds_bucket{job=~"x"}[$__rate_interval])))'
        " / fieldline_ingest_up"
    )
    assert metric_names(expr) == {"fieldline_ingest_lag_seconds_bucket", "fieldline_ingest_up"}
    text = (
        "# HELP fieldline_a_total A.\n# TYPE fieldline_a_total counter\n"
        'fieldline_a_total{reason="x"} 1.0\nfieldline_b_bucket{le="+Inf"} 0.0\n'
        "fieldline_c 3\n"
    )
    assert sample_names(text) == {"fieldline_a_total", "fieldline_b_bucket", "fieldline_c"}
    # a counter queried without its _total suffix is not exposed under that name
    assert missing_from(["rate(fieldline_a[5m])"], sample_names(text)) == {
        "rate(fieldline_a[5m])": {"fieldline_a"}
    }


def test_every_panel_queries_a_fieldline_metric() -> None:
    exprs = dashboard_exprs()
    assert len(exprs) >= 10
    assert [e for e in exprs if not metric_names(e)] == []


def _scrape(port: int) -> str:
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def _traffic(broker: BrokerUnderTest) -> None:
    """One of each thing the dashboard counts by label."""
    pki = broker.pki
    ca = pki.pki.ca_cert_path
    # an operator's persistent session, subscribed at QoS 0 and gone: the broker drops what
    # arrives for it (dropped{reason="offline-qos0"}) and counts the disconnect
    operator = RawClient(broker.host, broker.port, ca, pki.operator)
    try:
        assert operator.connect("ops-1", clean=False)[1] == 0
        assert operator.subscribe(("fl/acme/#", 0)) == [0]
    finally:
        operator.disconnect()
    # a device subscribing to another device's telemetry: SUBACK 0x80 and a denial
    device = RawClient(broker.host, broker.port, ca, pki.device)
    try:
        assert device.connect("dev-1")[1] == 0
        assert device.subscribe(("fl/acme/dev-2/telemetry", 1)) == [0x80]
    finally:
        device.disconnect()
    now = int(time.time() * 1000)
    status = {"state": "online", "boot": 1, "fw": "1.0.0"}
    messages = [("fl/acme/dev-1/status", json.dumps(status).encode())]
    messages += [
        (
            "fl/acme/dev-1/telemetry",
            json.dumps({"ts": now - 1000 + i, "seq": i + 1, "metrics": {"t": 20.0 + i}}).encode(),
        )
        for i in range(20)
    ]
    messages.append(("fl/acme/dev-1/telemetry", b"{not json"))  # a dead letter: bad_json
    burst(broker, pki.device, messages)


async def _wait_exposed(
    ports: list[int], wanted: set[str], timeout: float
) -> tuple[set[str], list[str]]:
    deadline = time.monotonic() + timeout
    while True:
        texts = [await asyncio.to_thread(_scrape, port) for port in ports]
        exposed = set().union(*(sample_names(t) for t in texts))
        if wanted <= exposed or time.monotonic() > deadline:
            return exposed, texts
        await asyncio.sleep(0.5)


async def test_every_dashboard_metric_is_exposed_by_a_running_service(
    broker_factory: Callable[..., BrokerUnderTest], timescale_dsn: str, tmp_path: Path
) -> None:
    exprs = dashboard_exprs()
    wanted = set().union(*(metric_names(e) for e in exprs))
    broker = broker_factory("fieldline")
    assert broker.metrics_port is not None
    worker = start_worker(broker, timescale_dsn, tmp_path / "worker")
    try:
        edge_port = free_port()
        # the machine heats ~10 degC/s at 20 samples/s: the 1 s average passes 35 quickly
        path = write_manifest(tmp_path, manifest_text(broker, *MACHINE_RESET))
        options = AgentOptions(home=tmp_path / "home", manifest_path=path, metrics_port=edge_port)
        agent = EdgeAgent(load_manifest(path), options)
        await agent.start()
        try:
            await asyncio.to_thread(_traffic, broker)
            ports = [broker.metrics_port, worker.metrics_port, edge_port]
            exposed, texts = await _wait_exposed(ports, wanted, 60)
        finally:
            await agent.stop()
    finally:
        worker.stop()
    gaps = missing_from(exprs, exposed)
    assert gaps == {}, f"queried but exposed by no service: {gaps}\n" + "\n".join(
        sorted(n for n in exposed if n.startswith("fieldline_"))
    )
    # each service contributes: the dashboard is not served by one endpoint alone
    prefixes = ("fieldline_broker_", "fieldline_ingest_", "fieldline_edge_")
    for text, prefix in zip(texts, prefixes, strict=True):
        assert any(n.startswith(prefix) for n in wanted & sample_names(text)), prefix
