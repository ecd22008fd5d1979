"""Real MQTT clients for the integration tests: paho-mqtt 2 and the mosquitto_pub/_sub binaries."""

from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from certs import Bundle
from tests.fixtures.brokers import BrokerUnderTest
from tests.fixtures.prereq import require_binary
from tests.mqtt_raw import RawClient


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    qos: int
    retain: bool


class Paho:
    """A paho-mqtt 2 client (MQTT 3.1.1) with a client certificate; records what it receives."""

    def __init__(
        self,
        broker: BrokerUnderTest,
        bundle: Bundle | None,
        *,
        client_id: str | None = None,
        clean: bool = True,
        will: tuple[str, bytes, int, bool] | None = None,
        keepalive: int = 30,
    ) -> None:
        self.broker = broker
        self.client_id = client_id or (bundle.identity.id if bundle else "anonymous")
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=clean,
            protocol=MQTTProtocolVersion.MQTTv311,
        )
        self.client.tls_set(
            ca_certs=str(broker.pki.pki.ca_cert_path),
            certfile=str(bundle.cert) if bundle else None,
            keyfile=str(bundle.key) if bundle else None,
        )
        if will is not None:
            self.client.will_set(will[0], will[1], will[2], will[3])
        self.keepalive = keepalive
        self.messages: list[Received] = []
        self._got = threading.Condition()
        self._connack = threading.Event()
        self.connack_rc: int | None = None
        self.session_present: bool | None = None
        self.disconnected = threading.Event()
        self._subacks: dict[int, list[int]] = {}
        self._subacked = threading.Condition()
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_disconnect = lambda *_a: self.disconnected.set()

    def _on_connect(self, _c: Any, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
        self.connack_rc = reason.value if hasattr(reason, "value") else int(reason)
        self.session_present = bool(getattr(flags, "session_present", False))
        self._connack.set()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._got:
            self.messages.append(Received(msg.topic, msg.payload, msg.qos, bool(msg.retain)))
            self._got.notify_all()

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, codes: Any, _p: Any) -> None:
        with self._subacked:
            self._subacks[mid] = [c.value if hasattr(c, "value") else int(c) for c in codes]
            self._subacked.notify_all()

    def connect(self, timeout: float = 5.0) -> bool:
        """True when the broker answered CONNACK 0; False for a refusal or a failed handshake."""
        try:
            self.client.connect(self.broker.host, self.broker.port, keepalive=self.keepalive)
        except OSError:
            return False
        self.client.loop_start()
        self._connack.wait(timeout)
        return self.connack_rc == 0

    def subscribe(self, topic_filter: str, qos: int = 1, timeout: float = 5.0) -> list[int]:
        """The SUBACK codes (0x80 refused); [] if no SUBACK came."""
        _rc, mid = self.client.subscribe(topic_filter, qos)
        with self._subacked:
            self._subacked.wait_for(lambda: mid in self._subacks, timeout)
            return self._subacks.get(mid, [])

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if qos:
            info.wait_for_publish(5)

    def wait_for(self, count: int, timeout: float = 5.0) -> list[Received]:
        """Wait until `count` messages arrived (or timeout); return all received so far."""
        with self._got:
            self._got.wait_for(lambda: len(self.messages) >= count, timeout)
            return list(self.messages)

    def topics(self) -> list[str]:
        return [m.topic for m in self.messages]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def raw(broker: BrokerUnderTest, bundle: Bundle | None) -> RawClient:
    """A RawClient with `bundle`'s certificate, connected over TLS (no CONNECT sent yet)."""
    return RawClient(broker.host, broker.port, broker.pki.pki.ca_cert_path, bundle)


def _tls_args(broker: BrokerUnderTest, bundle: Bundle) -> list[str]:
    # -i: the client id must be the certificate's CN (Mosquitto would bind it anyway)
    return [
        "-h", "127.0.0.1", "-p", str(broker.port), "--cafile", str(broker.pki.pki.ca_cert_path),
        "--cert", str(bundle.cert), "--key", str(bundle.key), "-i", bundle.identity.id,
    ]  # fmt: skip


def mosquitto_pub(
    broker: BrokerUnderTest, bundle: Bundle, topic: str, message: str, *args: str
) -> subprocess.CompletedProcess[str]:
    """Run mosquitto_pub with the bundle's certificate; the result tells how it went."""
    argv = [require_binary("mosquitto_pub"), *_tls_args(broker, bundle), "-t", topic, "-m", message]
    return subprocess.run([*argv, *args], capture_output=True, text=True, timeout=20, check=False)


class MosquittoSub:
    """mosquitto_sub in the background with -v: each line is `topic payload`."""

    def __init__(
        self, broker: BrokerUnderTest, bundle: Bundle, *filters: str, extra: tuple[str, ...] = ()
    ) -> None:
        topics = [arg for f in filters for arg in ("-t", f)]
        argv = [
            require_binary("mosquitto_sub"),
            *_tls_args(broker, bundle),
            *topics,
            "-v",
            "-q",
            "1",
        ]
        self.proc = subprocess.Popen(
            [*argv, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        time.sleep(0.6)  # mosquitto_sub has no "subscribed" signal

    def lines(self, wait: float = 1.0) -> list[str]:
        """Stop it after `wait` seconds and return what it printed."""
        time.sleep(wait)
        self.proc.terminate()
        out, _err = self.proc.communicate(timeout=10)
        return [line for line in out.splitlines() if line]
