"""A client's session as the embedded broker keeps it, with or without a live connection.

The attribute names a plugin reads (`client_id`, `username`, `ssl_object`, `will_flag`,
`will_topic`, `will_retain`, `attributes`, ...) are those of amqtt's `Session`, so plugins
written to amqtt's plugin interface see what they expect (docs/broker.md lists them).
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any

from broker import wire
from broker.outbox import Outbox

if TYPE_CHECKING:
    from broker.connection import Connection


class Session:
    """Identity, Will, outbox and QoS 2 state of one client id; `connection` is None offline."""

    def __init__(self, client_id: str, clean_session: bool, outbox: Outbox) -> None:
        self.client_id = client_id
        self.clean_session = clean_session
        self.outbox = outbox
        self.connection: Connection | None = None
        self.will: wire.Will | None = None
        self.keep_alive = 0
        self.username: str | None = None
        self.password: bytes | None = None
        self.ssl_object: ssl.SSLObject | None = None
        self.remote_address = "?"
        self.remote_port = 0
        # what plugins record about the connection: principal, certificate serial, denials
        self.attributes: dict[str, Any] = {}
        # QoS 2 packet ids received from the client and not yet released (MQTT 4.3.3)
        self.qos2_received: set[int] = set()
        # wall-clock time the session went offline (None while connected): its expiry counts
        # from here, across broker restarts
        self.offline_since: float | None = None
        # operations refused to this client, so its denials are logged sparingly
        self.denials = 0

    @classmethod
    def from_connect(
        cls,
        connect: wire.Connect,
        outbox: Outbox,
        ssl_object: ssl.SSLObject | None,
        peer: tuple[str, int] | None,
    ) -> Session:
        session = cls(connect.client_id, connect.clean_session, outbox)
        session.keep_alive = connect.keepalive
        session.will = connect.will
        session.username = connect.username
        session.password = connect.password
        session.ssl_object = ssl_object
        session.remote_address, session.remote_port = peer or ("?", 0)
        return session

    # -- amqtt's Session attribute names, for plugins ----------------------------------------
    @property
    def will_flag(self) -> bool:
        return self.will is not None

    @property
    def will_topic(self) -> str | None:
        return self.will.topic if self.will is not None else None

    @property
    def will_message(self) -> bytes | None:
        return self.will.payload if self.will is not None else None

    @property
    def will_qos(self) -> int | None:
        return self.will.qos if self.will is not None else None

    @property
    def will_retain(self) -> bool:
        return self.will is not None and self.will.retain

    @property
    def persistent(self) -> bool:
        """Kept after its connection ends (MQTT 3.1.1 CleanSession = 0)."""
        return not self.clean_session

    def resume_from(self, fresh: Session) -> None:
        """A persistent session taken up by a new, authenticated connection: its identity wins."""
        self.will = fresh.will
        self.keep_alive = fresh.keep_alive
        self.username = fresh.username
        self.password = fresh.password
        self.ssl_object = fresh.ssl_object
        self.remote_address, self.remote_port = fresh.remote_address, fresh.remote_port
        self.attributes.update(fresh.attributes)
