"""The device runtime's link on its stop path: a broker gone half-open, silent or unreachable.

A relay sits between the edge agent and a real Mosquitto; frozen, it keeps both TCP
connections open and forwards nothing, as a broker behind a dead NAT would. A silent server
completes TLS and never answers CONNECT. Either way the agent's stop must return and close
its socket with paho's public API only (DISCONNECT, then shutdown of `client.socket()`, and
paho's own read closes it).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest

from core.pgcluster import free_port
from device_runtime.errors import LinkError
from device_runtime.link import DeviceLink
from edge_agent.agent import AgentOptions, EdgeAgent
from edge_agent.manifest import load_manifest
from tests.fixtures.brokers import BrokerUnderTest
from tests.fixtures.edge import MACHINE_RESET, manifest_text, write_manifest
from tests.fixtures.ingest import wait_for
from tests.fixtures.pki import TestPki

pytestmark = pytest.mark.integration


class Relay:
    """A TCP relay to the broker; `freeze()` makes it half-open: it reads, forwards nothing."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.frozen = False
        self.client_closed = asyncio.Event()  # the agent closed its side
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    def freeze(self) -> None:
        self.frozen = True

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers += [writer, up_writer]
        await asyncio.gather(
            self._pipe(reader, up_writer, from_agent=True),
            self._pipe(up_reader, writer, from_agent=False),
            return_exceptions=True,
        )

    async def _pipe(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, *, from_agent: bool
    ) -> None:
        while True:
            try:
                data = await src.read(65536)
            except ConnectionError:
                data = b""
            if not data:
                if from_agent:
                    self.client_closed.set()
                if not self.frozen:
                    dst.close()
                return
            if not self.frozen:
                dst.write(data)
                await dst.drain()

    async def close(self) -> None:
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


def _agent(pki: TestPki, port: int, tmp_path: Path) -> EdgeAgent:
    """The test PKI's dev-2 with a simulated machine, its broker at 127.0.0.1:`port`."""
    target = cast(BrokerUnderTest, SimpleNamespace(pki=pki, host="127.0.0.1", port=port))
    tmp_path.mkdir(parents=True)
    path = write_manifest(tmp_path, manifest_text(target, *MACHINE_RESET))
    return EdgeAgent(load_manifest(path), AgentOptions(home=tmp_path / "home"))


async def test_stop_closes_the_link_when_the_broker_is_half_open_or_gone(
    broker_factory: Callable[..., BrokerUnderTest], tmp_path: Path
) -> None:
    broker = broker_factory("mosquitto")
    relay = Relay(broker.port)
    agent = _agent(broker.pki, await relay.start(), tmp_path / "a")
    await agent.start()
    try:

        async def publishing() -> bool:
            value = agent.metrics.registry.get_sample_value("fieldline_edge_published_total")
            return (value or 0) > 0

        await wait_for(publishing, 30, "PUBACKs through the relay")
        relay.freeze()  # half-open: the link still looks connected, nothing comes back
        await asyncio.wait_for(agent.stop(flush_s=0.2), 20)
        assert agent.link.client.socket() is None
        assert not agent.link.connected
        await asyncio.wait_for(relay.client_closed.wait(), 10)
    finally:
        await relay.close()

    # unreachable: nothing listens; the agent is between tries when it is told to stop
    gone = _agent(broker.pki, free_port(), tmp_path / "b")
    await gone.start()

    async def tried() -> bool:
        return gone.link.attempts >= 1 and not gone.link.connected

    await wait_for(tried, 10, "a failed connect")
    await asyncio.wait_for(gone.stop(flush_s=0.2), 10)
    assert gone.link.client.socket() is None


class SilentServer:
    """Completes the TLS handshake (mutual), reads, and never answers: no CONNACK."""

    def __init__(self, pki: TestPki) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(pki.server.cert, pki.server.key)
        self.context.load_verify_locations(pki.server.ca)
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.closed = 0  # connections the client closed
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.context)
        return int(self._server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.read(4096):
                pass
        except (ConnectionError, ssl.SSLError):
            pass
        self.closed += 1
        writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


async def test_a_connect_without_connack_leaves_no_socket_open(
    test_pki: TestPki, tmp_path: Path
) -> None:
    server = SilentServer(test_pki)
    port = await server.start()
    tls = ssl.create_default_context(cafile=str(test_pki.device2.ca))
    tls.load_cert_chain(test_pki.device2.cert, test_pki.device2.key)
    link = DeviceLink("dev-2", "127.0.0.1", port, tls)
    try:
        with pytest.raises(LinkError, match="no CONNACK"):
            await link.connect(timeout=0.5)
        assert link.client.socket() is None

        async def closed(n: int) -> bool:
            return server.closed >= n

        await wait_for(lambda: closed(1), 10, "the link to close its socket")

        # the agent stopped while it waits for a CONNACK: the half-made link is closed too
        agent = _agent(test_pki, port, tmp_path / "agent")
        await agent.start()

        async def waiting() -> bool:
            return agent.link.attempts >= 1 and agent.link.client.socket() is not None

        await wait_for(waiting, 10, "the agent's CONNECT to the silent server")
        await asyncio.wait_for(agent.stop(flush_s=0.2), 10)
        assert agent.link.client.socket() is None
        await wait_for(lambda: closed(2), 10, "the agent to close its socket")
    finally:
        await link.close()
        await server.close()


class DroppingServer(SilentServer):
    """Accepts the CONNECT with a CONNACK, then closes the connection at once."""

    def __init__(self, pki: TestPki) -> None:
        super().__init__(pki)
        self.accepted = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if await reader.read(4096):  # the CONNECT
                self.accepted += 1
                writer.write(b"\x20\x02\x00\x00")  # CONNACK, accepted
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        writer.close()


async def test_a_link_dropped_right_after_connack_backs_off(
    test_pki: TestPki, tmp_path: Path
) -> None:
    """Without backoff, a broker that accepts and drops (a client id taken over) got a new
    CONNECT every check (0.5 s) from every device."""
    server = DroppingServer(test_pki)
    port = await server.start()
    tls = ssl.create_default_context(cafile=str(test_pki.device2.ca))
    tls.load_cert_chain(test_pki.device2.cert, test_pki.device2.key)
    link = DeviceLink("dev-2", "127.0.0.1", port, tls)
    task = asyncio.create_task(link.stay_connected(lambda: None, check_s=0.2))
    try:

        async def accepted(n: int) -> bool:
            return server.accepted >= n

        await wait_for(lambda: accepted(1), 10, "the first CONNACK")
        first = asyncio.get_running_loop().time()
        await wait_for(lambda: accepted(4), 30, "three reconnects")
        # jittered backoff from 1 s: at least 0.5 + 1 + 2 s for three; every check_s it was 0.6
        assert asyncio.get_running_loop().time() - first >= 3.0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await link.close()
        await server.close()
