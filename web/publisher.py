"""Commands reach devices as MQTT publishes by an operator certificate of their tenant."""

from __future__ import annotations

import asyncio
import ssl
import threading
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from certs import CertsError, client_context
from core.settings import Settings
from web.errors import WebError


class NoCertificateError(WebError):
    """The tenant's web operator certificate is not issued (a 503 naming the command to run)."""


class PublishError(WebError):
    """The broker could not be reached, refused the certificate, or did not acknowledge."""


class CommandPublisher:
    """Publishes at QoS 1 and waits for the PUBACK, one connection per command; publishes of
    one identity are serialised (its client id is the certificate's CN: two at once would
    take each other's session)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._locks: dict[str, asyncio.Lock] = {}

    def identity(self, tenant: str) -> str:
        """The operator certificate this tenant's commands are sent as."""
        return self.settings.web.operator_identity.replace("{tenant}", tenant)

    def context(self, tenant: str) -> ssl.SSLContext:
        """The identity's TLS context; NoCertificateError says how to issue it."""
        identity = self.identity(tenant)
        try:
            return client_context(self.settings.pki_dir / "issued" / identity)
        except CertsError:
            raise NoCertificateError(
                f"commands to tenant {tenant} are sent as the operator certificate "
                f"{identity!r}, which is not issued here: run `fieldline certs issue {identity} "
                f"--tenant {tenant} --role operator` (or set web.operator_identity)"
            ) from None

    async def publish(self, tenant: str, topic: str, payload: bytes) -> None:
        """Publish at QoS 1 as the tenant's identity; PublishError unless PUBACKed in time."""
        context = self.context(tenant)
        identity = self.identity(tenant)
        lock = self._locks.setdefault(identity, asyncio.Lock())
        async with lock:
            await asyncio.to_thread(self._publish, identity, context, topic, payload)

    def _publish(self, identity: str, context: ssl.SSLContext, topic: str, payload: bytes) -> None:
        host, port = self.settings.broker.host, self.settings.broker.port
        timeout = self.settings.web.publish_timeout_s
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=identity, protocol=MQTTProtocolVersion.MQTTv311
        )
        connected = threading.Event()
        connack: list[int] = []

        def on_connect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            connack.append(int(getattr(reason, "value", reason)))
            connected.set()

        client.on_connect = on_connect
        client.tls_set_context(context)
        try:
            client.connect(host, port, keepalive=30)
        except (OSError, ssl.SSLError) as exc:
            raise PublishError(f"cannot reach the broker at {host}:{port}: {exc}") from exc
        client.loop_start()
        try:
            if not connected.wait(timeout) or connack != [0]:
                raise PublishError(
                    f"the broker at {host}:{port} refused {identity!r} (CONNACK {connack}): is "
                    "its certificate an operator's of this tenant, and not revoked?"
                )
            info = client.publish(topic, payload, qos=1)
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError) as exc:  # the connection dropped meanwhile
                raise PublishError(f"the broker dropped the connection: {exc}") from exc
            if not info.is_published():
                raise PublishError(
                    f"the broker did not acknowledge the command within {timeout:g} s"
                )
        finally:
            client.disconnect()
            client.loop_stop()
            # loop_stop() leaves loop_start()'s wake-up socket pair open until the client is
            # collected (paho-mqtt#627): one client per command would hold 2 descriptors each
            client.reinitialise()
