"""Limits of the embedded broker against one client: its time to log in, its subscriptions.

A client that completes the TLS handshake and then sends nothing holds a connection slot and
its buffers; the embedded broker must drop it at the CONNECT deadline. A graceful TLS close
would wait up to 30 s more for the client's close_notify, which such a client never sends.
"""

from __future__ import annotations

import select
import socket
import ssl
import time
from collections.abc import Callable

import pytest

from tests.clients import raw
from tests.fixtures.brokers import BrokerUnderTest

pytestmark = pytest.mark.integration

GONE = select.POLLRDHUP | select.POLLHUP | select.POLLERR


def test_tls_connections_without_connect_are_closed_at_the_deadline(
    broker_factory: Callable[..., BrokerUnderTest],
) -> None:
    broker = broker_factory("fieldline", env={"FIELDLINE_BROKER__CONNECT_TIMEOUT_S": "1"})
    device = broker.pki.device
    context = ssl.create_default_context(cafile=str(broker.pki.pki.ca_cert_path))
    context.load_cert_chain(str(device.cert), str(device.key))
    poller = select.poll()
    socks = []
    try:
        for _ in range(20):
            raw = socket.create_connection((broker.host, broker.port), timeout=10)
            tls = context.wrap_socket(raw, server_hostname="localhost")  # handshake, no CONNECT
            socks.append(tls)
            poller.register(tls.fileno(), GONE)
        opened = time.monotonic()
        open_fds = {s.fileno() for s in socks}
        # the broker's FIN (or reset) is what frees the attacker's slot; 1 s deadline, and
        # 10 s is still far below the 30 s a graceful TLS shutdown would wait
        while open_fds and time.monotonic() - opened < 10:
            for fd, _events in poller.poll(200):
                open_fds.discard(fd)
                poller.unregister(fd)
        assert not open_fds, f"{len(open_fds)} of 20 still open after 10 s"
    finally:
        for s in socks:
            s.close()
    assert "connect-timeout" in broker.log_text()


def test_a_client_holds_at_most_max_subscriptions_filters(
    broker_factory: Callable[..., BrokerUnderTest],
) -> None:
    """Every filter costs the broker memory, kept by an offline session for days: one device
    once subscribed 400,000 filters under its own cmd/# (78 -> 248 MiB in 12 s)."""
    broker = broker_factory("fieldline", env={"FIELDLINE_BROKER__MAX_SUBSCRIPTIONS": "5"})
    device = broker.pki.device
    client = raw(broker, device)
    try:
        assert client.connect(device.identity.id)[1] == 0
        filters = [(f"fl/acme/dev-1/cmd/x{n}", 1) for n in range(7)]
        assert client.subscribe(*filters[:5]) == [1] * 5
        assert client.subscribe(filters[5]) == [0x80]  # the sixth
        assert client.subscribe(filters[0]) == [1]  # a filter it holds: a new QoS, not more
    finally:
        client.close()
    assert "broker.max_subscriptions is 5" in broker.log_text()
    assert 'reason="too-many-subscriptions"' in broker.metrics()
