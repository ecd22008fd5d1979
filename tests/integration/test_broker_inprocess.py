"""The embedded broker in this process: its plugin set, plugins that refuse, CRL handling."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path
from typing import Any

import pytest
from amqtt.contexts import Action as AmqttAction
from amqtt.plugins.base import BaseTopicPlugin

from broker.errors import TlsSetupError
from broker.plugins import CertificateAuthPlugin, PolicyTopicPlugin
from broker.revocation import RevocationList
from broker.server import BrokerOptions, FieldlineBroker
from certs import Pki, Role
from tests.fixtures.pki import TestPki
from tests.mqtt_raw import RawClient

pytestmark = pytest.mark.integration


class DenyDev2Status(BaseTopicPlugin):
    """A second topic plugin: nobody may receive dev-2's status."""

    @dataclasses.dataclass
    class Config:
        topic: str = "fl/acme/dev-2/status"

    async def topic_filtering(self, *, session: Any = None, topic: str | None = None,
                              action: Any = None, retain: bool = False) -> bool:  # fmt: skip
        return not (action == AmqttAction.RECEIVE and topic == self.config.topic)


def _options(pki: TestPki, **changes: Any) -> BrokerOptions:
    return BrokerOptions(
        pki.pki.ca_cert_path, pki.server.cert, pki.server.key, pki.pki.crl_path, port=0, **changes
    )


async def test_only_fieldlines_plugins_are_loaded(test_pki: TestPki) -> None:
    broker = FieldlineBroker(_options(test_pki))
    kinds = sorted(type(p).__name__ for p in broker.plugins)
    assert kinds == sorted([CertificateAuthPlugin.__name__, PolicyTopicPlugin.__name__])
    assert "Anonymous" not in str(broker.options.plugin_config())


async def test_every_delivery_passes_every_topic_plugin(test_pki: TestPki) -> None:
    """Retained messages sent on SUBSCRIBE are RECEIVE-checked like live ones."""
    path = f"{__name__}.{DenyDev2Status.__name__}"
    async with FieldlineBroker(_options(test_pki, extra_plugins={path: {}})) as broker:
        port = broker.port

        def scenario() -> tuple[list[str], list[str]]:
            def client(bundle: Any) -> RawClient:
                c = RawClient("127.0.0.1", port, test_pki.pki.ca_cert_path, bundle)
                assert c.connect(bundle.identity.id)[1] == 0
                return c

            for bundle in (test_pki.device, test_pki.device2):
                c = client(bundle)
                c.publish(f"fl/acme/{bundle.identity.id}/status", b"online", qos=1, retain=True)
                c.disconnect()
            ops = client(test_pki.operator)
            assert ops.subscribe(("fl/acme/#", 1)) == [1]
            retained = [m.topic for m in ops.publishes(1.0)]
            dev2 = client(test_pki.device2)
            dev2.publish("fl/acme/dev-2/status", b"live", qos=1)
            dev2.publish("fl/acme/dev-2/telemetry", b"live", qos=1)
            live = [m.topic for m in ops.publishes(1.0)]
            ops.close()
            dev2.close()
            return retained, live

        retained, live = await asyncio.to_thread(scenario)
    assert retained == ["fl/acme/dev-1/status"]
    assert live == ["fl/acme/dev-2/telemetry"]


def test_a_crl_from_another_ca_is_refused(tmp_path: Path, test_pki: TestPki) -> None:
    other = Pki(tmp_path / "other")
    other.init_ca()
    with pytest.raises(TlsSetupError, match="not signed by the fieldline CA"):
        RevocationList(other.crl_path, test_pki.pki.ca_cert_path)


def test_a_broken_crl_keeps_the_last_good_one(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    pki.init_ca()
    pki.issue("d-1", tenant="acme", role=Role.DEVICE)
    crl = RevocationList(pki.crl_path, pki.ca_cert_path)
    assert not crl.refresh()  # unchanged file
    record = pki.revoke("d-1")
    assert crl.refresh()
    assert crl.is_revoked(record.serial)
    pki.crl_path.write_text("-----BEGIN X509 CRL-----\ngarbage\n-----END X509 CRL-----\n")
    assert not crl.refresh()
    assert crl.is_revoked(record.serial)  # a half-written file unrevokes nobody


async def test_an_offline_session_and_its_queue_expire_after_session_expiry_s(
    test_pki: TestPki, tmp_path: Path
) -> None:
    """Kept while offline for less than broker.session_expiry_s, deleted (and from the durable
    store) once it has been offline that long, and only then."""
    expiry = 2
    store = tmp_path / "store.sqlite3"
    async with FieldlineBroker(
        _options(test_pki, session_expiry_s=expiry, store_file=store)
    ) as broker:
        port = broker.port

        def client(bundle: Any, client_id: str, **connect: Any) -> tuple[RawClient, bool]:
            c = RawClient("127.0.0.1", port, test_pki.pki.ca_cert_path, bundle)
            present, code = c.connect(client_id, **connect)
            assert code == 0
            return c, present

        def go_away_with_one_queued() -> None:
            sub, _ = client(test_pki.operator, "ops-1", clean=False)
            assert sub.subscribe(("fl/acme/dev-1/events", 1)) == [1]
            sub.disconnect()
            dev, _ = client(test_pki.device, "dev-1")
            dev.publish("fl/acme/dev-1/events", b"for ops-1", qos=1)
            dev.disconnect()

        await asyncio.to_thread(go_away_with_one_queued)
        state = broker.session_state("ops-1")
        assert state is not None
        assert not state.connected
        assert state.queued == 1
        assert state.offline_since is not None
        deadline = time.monotonic() + 20
        while broker.session_state("ops-1") is not None:
            assert time.monotonic() < deadline, "the offline session never expired"
            await asyncio.sleep(0.05)
        assert time.time() - state.offline_since >= expiry  # not before its time

    # the store forgot it too: a restarted broker does not bring it (or its queue) back
    async with FieldlineBroker(_options(test_pki, store_file=store)) as broker:
        assert broker.session_state("ops-1") is None
        port = broker.port

        def come_back() -> tuple[bool, list[bytes]]:
            sub, present = client(test_pki.operator, "ops-1", clean=False)
            got = [m.payload for m in sub.publishes(0.5)]
            sub.close()
            return present, got

        assert await asyncio.to_thread(come_back) == (False, [])
