"""tests.clients.Paho gives back every socket it opened when it is closed, not when collected.

paho-mqtt 2.2's `loop_stop()` leaves `loop_start()`'s wake-up socket pair open until the
Client is collected (eclipse-paho/paho.mqtt.python#627). The wrapper's callbacks make a
reference cycle, so that is the cyclic collector's job, in whichever thread runs the next full
collection, and it may finalize the sockets before the Client's `__del__` closes them: an
"unclosed <socket.socket ... proto=0, laddr=127.0.0.1, raddr=127.0.0.1>" ResourceWarning, an
error under `filterwarnings = error`, blamed on whatever test was running (once the Pico
firmware's own `gc.collect()`).
"""

from __future__ import annotations

import gc
import os
import time
import warnings

import pytest

from tests.clients import Paho
from tests.fixtures.brokers import BrokerUnderTest

pytestmark = pytest.mark.integration


def _open_sockets() -> set[str]:
    """This process's open sockets, as `socket:[inode]` (Linux /proc)."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed since the listing
            continue
        if target.startswith("socket:"):
            found.add(target)
    return found


@pytest.mark.parametrize("broker", ["mosquitto"], indirect=True)
def test_close_releases_every_socket_at_once(broker: BrokerUnderTest) -> None:
    gc.collect()  # what earlier tests left to the collector is not this test's business
    before = _open_sockets()
    client = Paho(broker, broker.pki.operator)
    assert client.connect()
    opened = _open_sockets() - before
    assert len(opened) >= 3, opened  # TLS to the broker and the loop's socket pair
    client.close()
    deadline = time.monotonic() + 5
    while (left := opened & _open_sockets()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not left, f"{len(left)} socket(s) still open after close(), with the client alive"


@pytest.mark.parametrize("broker", ["mosquitto"], indirect=True)
def test_a_closed_client_leaves_the_collector_nothing_to_warn_about(
    broker: BrokerUnderTest,
) -> None:
    """The CI failure, forced: the Client a generation older than its socket pair, so a full
    collection (CPython merges the young generation in first) finalizes the sockets first."""
    gc.collect()
    gc.disable()  # no automatic collection may reorder the generations below
    try:
        client = Paho(broker, broker.pki.operator)
        gc.collect(0)  # the Client ages into generation 1
        assert client.connect()  # loop_start(): the socket pair is born in generation 0
        client.close()
        del client  # the wrapper and the Client: cyclic garbage
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            gc.collect()  # as the Pico firmware does before every TLS handshake
    finally:
        gc.enable()
    unclosed = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert not unclosed, unclosed
