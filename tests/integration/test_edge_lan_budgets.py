"""One hostile device on the gateway's LAN cannot crowd out the others (edge_agent/languard.py).

A real agent with a LAN listener, a real upstream broker (the embedded one) and real paho
devices with certificates of the test PKI: `dev-evil` floods, invents metric names, sends
samples from the past and the future and names too long; `dev-1` is honest and must get
through unharmed, its rule included.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from certs import Role
from core.pgcluster import free_port
from edge_agent.agent import AgentOptions, EdgeAgent
from edge_agent.errors import OutboxError
from edge_agent.languard import LanLimits
from edge_agent.manifest import load_manifest
from tests.clients import Paho
from tests.fixtures.edge import (
    LAN_HOT_RULE,
    LAN_LISTENER,
    LAN_ROUTES,
    manifest_text,
    write_manifest,
)
from tests.fixtures.ingest import wait_for

pytestmark = pytest.mark.integration

LIMITS = LanLimits(readings_per_s=1.0, burst_s=10.0, metrics_per_device=22)


def _ms() -> int:
    return int(time.time() * 1000)


def _upstream(ops: Paho) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(telemetry samples, events) the agent has published upstream so far."""
    samples: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    for m in list(ops.messages):
        body = json.loads(m.payload)
        if m.topic.endswith("/telemetry"):
            samples.extend(body.get("samples") or [body])
        elif m.topic.endswith("/events"):
            events.append(body)
    return samples, events


def _with(samples: list[dict[str, Any]], prefix: str) -> list[str]:
    return [name for s in samples for name in s["metrics"] if name.startswith(prefix)]


async def test_one_hostile_lan_device_cannot_crowd_out_the_others(
    broker_factory: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = broker_factory("fieldline")
    port = free_port()
    text = manifest_text(broker, LAN_LISTENER.format(port=port), LAN_HOT_RULE, LAN_ROUTES)
    path = write_manifest(tmp_path, text)
    lan = SimpleNamespace(host="127.0.0.1", port=port, pki=broker.pki)
    evil_bundle = broker.pki.pki.issue("dev-evil", tenant="acme", role=Role.DEVICE)
    ops = Paho(broker, broker.pki.operator)
    assert await asyncio.to_thread(ops.connect)
    assert await asyncio.to_thread(ops.subscribe, "fl/acme/dev-2/#") == [1]
    options = AgentOptions(
        home=tmp_path / "home", manifest_path=path, pki_dir=broker.pki.pki.root, lan=LIMITS
    )
    agent = EdgeAgent(load_manifest(path), options)
    await agent.start()
    honest = Paho(lan, broker.pki.device)  # type: ignore[arg-type]
    evil = Paho(lan, evil_bundle)  # type: ignore[arg-type]
    try:
        assert await asyncio.to_thread(honest.connect)
        assert await asyncio.to_thread(evil.connect)

        def send(client: Paho, device: str, body: dict[str, Any]) -> None:
            client.publish(f"fl/acme/{device}/telemetry", json.dumps(body).encode())

        # a clock far ahead (within ingest's 300 s): it must not move dev-1's rule's time
        await asyncio.to_thread(
            send, evil, "dev-evil", {"ts": _ms() + 250_000, "metrics": {"temperature": 99}}
        )
        # a month old: ingest would refuse it (and with it a whole backlog batch)
        old = _ms() - 30 * 86_400_000
        await asyncio.to_thread(send, evil, "dev-evil", {"ts": old, "metrics": {"old": 1}})
        # 64 characters is ingest's limit, `lan.dev-evil.` makes it longer
        long = {"x" * 60: 1, "fine": 2}
        await asyncio.to_thread(send, evil, "dev-evil", {"ts": _ms(), "metrics": long})

        # invented names: 30 in one message; with `temperature` and `fine` it may have 22
        names = {f"m{i:02d}": i for i in range(30)}
        await asyncio.to_thread(send, evil, "dev-evil", {"ts": _ms(), "metrics": names})

        # the flood: 200 messages as fast as the broker acknowledges them
        def flood() -> None:
            for i in range(200):
                send(evil, "dev-evil", {"ts": _ms(), "metrics": {"fine": i}})

        await asyncio.to_thread(flood)

        # dev-1 reads hot now: its rule fires, and all of its readings go upstream
        for i in range(5):
            await asyncio.to_thread(
                send, honest, "dev-1", {"ts": _ms(), "seq": i + 1, "metrics": {"temperature": 60}}
            )

        async def honest_through() -> bool:
            samples, events = _upstream(ops)
            hot = [e for e in events if e["kind"] == "hot"]
            return len(_with(samples, "lan.dev-1.")) == 5 and bool(hot)

        await wait_for(honest_through, 20, "dev-1's 5 readings and its rule's event upstream")
        assert agent.rules["hot"].late == 0, "dev-evil's clock made dev-1's readings late"

        def refused(what: str, reason: str) -> float:
            labels = {"listener": "lan", "what": what, "reason": reason}
            value = agent.metrics.registry.get_sample_value(
                "fieldline_edge_lan_refused_total", labels
            )
            return value or 0.0

        async def all_told() -> bool:
            _, events = _upstream(ops)
            told = {e["data"]["reason"] for e in events if e["kind"] == "lan_refused"}
            return told >= {"rate", "metric_limit", "too_old", "name"}

        await wait_for(all_told, 20, "a lan_refused event for each of dev-evil's offences")
        samples, events = _upstream(ops)
        evil_names = set(_with(samples, "lan.dev-evil."))
        assert len(evil_names) == LIMITS.metrics_per_device
        assert "lan.dev-evil.old" not in evil_names
        assert not any(len(n) > 64 for n in evil_names)
        # the flood: its burst (10 readings) and ~1 a second more, the rest refused
        flooded = _with(samples, "lan.dev-evil.fine")
        assert len(flooded) < 60, f"{len(flooded)} of 200 flooded readings went upstream"
        assert refused("messages", "rate") >= 140
        assert refused("metrics", "metric_limit") == 10
        assert refused("samples", "too_old") == 1
        assert refused("metrics", "name") == 1
        told = [e for e in events if e["kind"] == "lan_refused" and e["data"]["reason"] == "rate"]
        assert len(told) == 1, "one event a minute per device and reason, not one per message"
        gauge = agent.metrics.registry.get_sample_value(
            "fieldline_edge_lan_metric_names", {"listener": "lan"}
        )
        assert gauge == LIMITS.metrics_per_device + 1  # and dev-1's temperature

        # nothing is acknowledged before it is durable: while the outbox cannot take dev-1's
        # reading, its PUBLISH gets no PUBACK; the next one, once it can, does
        def full(*_args: Any, **_kwargs: Any) -> None:
            raise OutboxError("disk full")

        monkeypatch.setattr(agent.outbox, "put", full)
        topic, body = "fl/acme/dev-1/telemetry", {"ts": _ms(), "metrics": {"temperature": 1}}
        lost = honest.client.publish(topic, json.dumps(body).encode(), qos=1)
        await asyncio.to_thread(lost.wait_for_publish, 2)
        monkeypatch.undo()
        kept = honest.client.publish(topic, json.dumps(body).encode(), qos=1)
        await asyncio.to_thread(kept.wait_for_publish, 10)
        assert kept.is_published()
        assert not lost.is_published(), "acknowledged a reading the outbox did not take"
    finally:
        for client in (honest, evil, ops):
            await asyncio.to_thread(client.close)
        await agent.stop()
