"""Real MQTT clients for the integration tests: paho-mqtt 2 and the mosquitto_pub/_sub binaries."""

from __future__ import annotations

import subprocess
import threading
import uuid
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

    def until_marker(self, payload: bytes, timeout: float = 5.0) -> list[Received]:
        """Wait for the message carrying `payload`; drop it and return what arrived before it.

        A broker sends a client its messages in the order it routed them, so once a marker
        published after some forbidden message is here, that message would have been too:
        a faster and stronger "nothing else arrived" than a quiet period.
        """
        with self._got:
            arrived = self._got.wait_for(
                lambda: any(m.payload == payload for m in self.messages), timeout
            )
            assert arrived, f"{self.client_id}: the marker {payload!r} never arrived"
            at = next(i for i, m in enumerate(self.messages) if m.payload == payload)
            before = self.messages[:at]
            del self.messages[at]
            return before

    def marker(self, topic: str, qos: int = 1, timeout: float = 5.0) -> list[Received]:
        """Publish a marker on `topic` (one this client may publish to and is subscribed to)
        and return everything that arrived before it came back (see `until_marker`)."""
        payload = f"marker-{uuid.uuid4().hex}".encode()
        self.publish(topic, payload, qos=qos)
        return self.until_marker(payload, timeout)

    def close(self) -> None:
        """Disconnect, stop the network thread and close every socket the client opened."""
        self.client.disconnect()
        self.client.loop_stop()
        # paho-mqtt 2.2's loop_stop() leaves loop_start()'s wake-up socket pair open until the
        # Client is collected (eclipse-paho/paho.mqtt.python#627); our callbacks make a cycle,
        # and the cyclic collector may finalize those sockets before Client.__del__ closes
        # them: a ResourceWarning (an error here) in whichever test runs the next full
        # collection. reinitialise() is paho's public call that closes them now.
        self.client.reinitialise()


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
            require_binary("stdbuf"),
            "-oL",  # line-buffered: each line reaches us when printed, not at exit
            require_binary("mosquitto_sub"),
            *_tls_args(broker, bundle),
            *topics,
            "-v",
            "-q",
            "1",
            "-d",  # its debug lines say when the SUBACK came: "Subscribed (mid: 1): 1"
        ]
        self.proc = subprocess.Popen(
            [*argv, *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self._out: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        with self._changed:
            subscribed = self._changed.wait_for(
                lambda: (
                    any(line.startswith("Subscribed") for line in self._out)
                    or self.proc.poll() is not None
                ),
                10,
            )
        if not subscribed:
            self.proc.kill()  # no process outlives the test
        assert subscribed, f"mosquitto_sub: no SUBACK in {self._out}"
        assert self.proc.poll() is None, f"mosquitto_sub exited: {self._out}"

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self._out.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def _messages(self) -> list[str]:
        debug = ("Client ", "Subscribed (mid")
        return [line for line in self._out if line and not line.startswith(debug)]

    def lines(self, count: int, timeout: float = 5.0) -> list[str]:
        """Wait for `count` message lines (or the timeout), stop it, return what it printed."""
        with self._changed:
            self._changed.wait_for(lambda: len(self._messages()) >= count, timeout)
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self._reader.join(10)  # it read to the end of the output
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        with self._changed:
            return self._messages()
