"""The fixtures themselves: each broker really serves TLS on its free port and stops cleanly."""

from __future__ import annotations

import threading

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.fixtures.amqtt import AmqttProcess
from tests.fixtures.pki import TestPki

pytestmark = pytest.mark.integration


def test_plain_amqtt_serves_tls_and_stops(plain_amqtt: AmqttProcess, test_pki: TestPki) -> None:
    got = threading.Event()
    received: list[bytes] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="dev-1")
    client.tls_set(
        ca_certs=str(test_pki.pki.ca_cert_path),
        certfile=str(test_pki.device.cert),
        keyfile=str(test_pki.device.key),
    )

    def on_message(_c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        received.append(msg.payload)
        got.set()

    subscribed = threading.Event()
    client.on_message = on_message
    client.on_subscribe = lambda *_a: subscribed.set()
    client.connect(plain_amqtt.host, plain_amqtt.port)
    client.loop_start()
    try:
        client.subscribe("fl/acme/dev-1/cmd/#", qos=1)
        assert subscribed.wait(5)
        client.publish("fl/acme/dev-1/cmd/reset", b"{}", qos=1).wait_for_publish(5)
        assert got.wait(5)
        assert received == [b"{}"]
    finally:
        client.disconnect()
        client.loop_stop()
    plain_amqtt.stop()
    assert plain_amqtt.proc.poll() is not None
