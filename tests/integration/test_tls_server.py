"""The broker's own TLS layer (broker.tlsserver) with a real listening socket and real clients.

Clients are Python `ssl` sockets (blocking, in threads) and an asyncio TLS client; the server
context is the broker's (`broker.tls.server_context`: client certificate required, CRL).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from broker.tls import ReloadableTls, server_context
from broker.tlsserver import (
    HANDSHAKE_CAP,
    HANDSHAKE_FAILED,
    HANDSHAKE_TIMEOUT,
    start_tls_server,
)
from certs import Bundle
from tests.fixtures.pki import TestPki
from tests.mqtt_raw import tls_context

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Listening:
    """A running start_tls_server: its port, what it refused, and every handler call."""

    port: int
    refused: list[str]
    calls: int = 0
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


def server_ctx(pki: TestPki, ca: Bundle | None = None) -> ssl.SSLContext:
    """The broker's listener context; `ca`: trust that bundle's CA for clients instead."""
    return server_context(
        ca.ca if ca is not None else pki.pki.ca_cert_path,
        pki.server.cert,
        pki.server.key,
        pki.pki.crl_path if ca is None else None,
    )


@contextlib.asynccontextmanager
async def serving(
    handle: Handler,
    context: ssl.SSLContext | Callable[[], ssl.SSLContext],
    *,
    handshake_timeout: float = 5.0,
    max_pending_handshakes: int = 100,
    close_timeout: float = 10.0,
) -> AsyncIterator[Listening]:
    refused: list[str] = []
    state = Listening(0, refused)

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.calls += 1
        state.writers.append(writer)
        task = asyncio.current_task()
        assert task is not None
        state.tasks.add(task)
        try:
            await handle(reader, writer)
        except Exception as exc:
            state.errors.append(exc)
        finally:
            if not writer.is_closing():
                writer.close()

    server = await start_tls_server(
        accept,
        "127.0.0.1",
        0,
        context,
        handshake_timeout=handshake_timeout,
        max_pending_handshakes=max_pending_handshakes,
        close_timeout=close_timeout,
        on_refused=refused.append,
    )
    state.port = server.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        server.close()
        for writer in state.writers:
            writer.transport.abort()
        if state.tasks:
            _done, stuck = await asyncio.wait(state.tasks, timeout=5)
            for task in stuck:
                task.cancel()
            await asyncio.gather(*state.tasks, return_exceptions=True)
            assert not stuck, "a handler did not end once its connection was aborted"
        await server.wait_closed()


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def settled(value: Callable[[], int], window: float = 0.3) -> int:
    """`value()` once it has not changed for `window` seconds (a stalled peer)."""
    last = value()
    while True:
        await asyncio.sleep(window)
        if value() == last:
            return last
        last = value()


def tls_client(
    pki: TestPki, port: int, bundle: Bundle | None, *, rcvbuf: int = 0, sndbuf: int = 0
) -> ssl.SSLSocket:
    """A blocking TLS client; ragged EOFs raise, so a clean close_notify is told apart."""
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if sndbuf:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    raw.settimeout(10)
    try:
        raw.connect(("127.0.0.1", port))
        return tls_context(pki.pki.ca_cert_path, bundle).wrap_socket(
            raw, server_hostname="localhost", suppress_ragged_eofs=False
        )
    except BaseException:
        raw.close()
        raise


def read_all(sock: ssl.SSLSocket, size: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        chunk = sock.recv(min(256 * 1024, size - len(out)))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def pattern(size: int) -> bytes:
    """Bytes whose every 4-byte word is its own offset: a misplaced or lost piece shows."""
    return b"".join(i.to_bytes(4, "big") for i in range(0, size, 4))[:size]


# -- data both ways ------------------------------------------------------------------------
async def test_echo_of_several_mib_both_ways(test_pki: TestPki) -> None:
    size = 6 * MiB
    eof_seen = asyncio.Event()

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(64 * 1024):
            writer.write(data)
            await writer.drain()
        eof_seen.set()  # the client's close_notify

    payload = os.urandom(size)
    async with serving(echo, server_ctx(test_pki)) as server:
        client_ctx = tls_context(test_pki.pki.ca_cert_path, test_pki.device)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", server.port, ssl=client_ctx, server_hostname="localhost"
        )

        async def send() -> None:
            for start in range(0, size, 100_000):
                writer.write(payload[start : start + 100_000])
                await writer.drain()

        sender = asyncio.create_task(send())
        echoed = await asyncio.wait_for(reader.readexactly(size), 20)
        await sender
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()
        await asyncio.wait_for(eof_seen.wait(), 5)
        assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
        assert server.calls == 1
        assert server.errors == []
        assert server.refused == []


async def test_peer_certificate_and_address_are_visible(test_pki: TestPki) -> None:
    seen: dict[str, object] = {}

    async def look(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ssl_object = writer.get_extra_info("ssl_object")
        seen["der"] = ssl_object.getpeercert(binary_form=True)
        seen["peername"] = writer.get_extra_info("peername")
        seen["context"] = writer.get_extra_info("sslcontext")
        writer.write(b"ok")
        await writer.drain()
        await reader.read()

    context = server_ctx(test_pki)
    async with serving(look, context) as server:
        sock = await asyncio.to_thread(tls_client, test_pki, server.port, test_pki.device)
        with sock:
            assert await asyncio.to_thread(sock.recv, 2) == b"ok"
            expected = ssl.PEM_cert_to_DER_cert(test_pki.device.cert.read_text())
            assert seen["der"] == expected
            assert seen["peername"] == sock.getsockname()
            assert seen["context"] is context


# -- refusals before the callback ----------------------------------------------------------
@pytest.mark.parametrize("who", ["no-certificate", "wrong_ca", "revoked"])
async def test_a_client_without_a_valid_certificate_is_refused_quietly(
    test_pki: TestPki, who: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def never(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise AssertionError("the callback ran for a refused client")

    bundle = None if who == "no-certificate" else getattr(test_pki, who)
    caplog.set_level(logging.DEBUG, logger="broker.tls")
    async with serving(never, server_ctx(test_pki)) as server:

        def attempt() -> bytes:
            # TLS 1.3: the client's handshake ends before the server has checked its
            # certificate; the refusal comes as an alert on the first read
            with tls_client(test_pki, server.port, bundle) as sock:
                sock.sendall(b"\x10hello")
                return sock.recv(10)

        with pytest.raises((ssl.SSLError, ConnectionError)):
            await asyncio.to_thread(attempt)
        await until(lambda: server.refused == [HANDSHAKE_FAILED])
        assert server.calls == 0
    records = [r for r in caplog.records if r.name == "broker.tls"]
    assert records
    assert all(r.levelno == logging.DEBUG and r.exc_info is None for r in records)
    assert "reason=handshake-failed" in records[0].getMessage()


async def test_a_socket_that_never_says_hello_is_dropped_after_the_timeout(
    test_pki: TestPki,
) -> None:
    async def never(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise AssertionError("the callback ran without a handshake")

    async with serving(never, server_ctx(test_pki), handshake_timeout=0.5) as server:

        def silent() -> tuple[bytes, float]:
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
                start = time.monotonic()
                try:
                    data = sock.recv(1)
                except ConnectionResetError:
                    data = b""
                return data, time.monotonic() - start

        data, waited = await asyncio.to_thread(silent)
        assert data == b""  # dropped, not left open until the socket timeout (10 s)
        assert waited >= 0.4  # and not before the timeout
        assert server.refused == [HANDSHAKE_TIMEOUT]
        assert server.calls == 0


async def test_handshakes_beyond_the_cap_are_aborted_before_any_tls_work(
    test_pki: TestPki,
) -> None:
    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    context = server_ctx(test_pki)
    built = 0

    def contexts() -> ssl.SSLContext:
        nonlocal built
        built += 1
        return context

    async with serving(hold, contexts, max_pending_handshakes=2) as server:
        # two sockets that never send a ClientHello hold both handshake slots
        holders = [
            await asyncio.to_thread(socket.create_connection, ("127.0.0.1", server.port), 10)
            for _ in range(2)
        ]
        try:
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await asyncio.to_thread(tls_client, test_pki, server.port, test_pki.device)
            assert server.refused == [HANDSHAKE_CAP]
            assert built == 0  # the refused ClientHello never reached OpenSSL
        finally:
            for holder in holders:
                holder.close()

        # the slots free when the holders go: a device gets in again
        async def connects() -> bool:
            try:
                sock = await asyncio.to_thread(tls_client, test_pki, server.port, test_pki.device)
            except (ssl.SSLError, ConnectionError):
                return False
            sock.close()
            return True

        deadline = time.monotonic() + 5
        while not await connects():
            assert time.monotonic() < deadline, "the handshake slots were not freed"
            await asyncio.sleep(0.02)
        await until(lambda: server.calls >= 1)
        assert built >= 1


async def test_the_context_is_taken_per_connection(test_pki: TestPki) -> None:
    async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hi")
        await writer.drain()
        await reader.read()

    current = [server_ctx(test_pki)]
    async with serving(greet, lambda: current[0]) as server:

        def hello(bundle: Bundle) -> bytes:
            with tls_client(test_pki, server.port, bundle) as sock:
                return sock.recv(2)

        assert await asyncio.to_thread(hello, test_pki.device) == b"hi"
        current[0] = server_ctx(test_pki, ca=test_pki.wrong_ca)  # trust the other CA only
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await asyncio.to_thread(hello, test_pki.device)
        assert await asyncio.to_thread(hello, test_pki.wrong_ca) == b"hi"
        assert server.calls == 2


async def test_the_brokers_reloadable_context_works_per_connection(test_pki: TestPki) -> None:
    """ReloadableTls switches contexts in its SNI callback; that works on wrap_bio too."""

    async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hi")
        await writer.drain()
        await reader.read()

    pki = test_pki.pki
    tls = ReloadableTls(pki.ca_cert_path, test_pki.server.cert, test_pki.server.key, pki.crl_path)
    async with serving(greet, lambda: tls.listener_context) as server:

        def hello(bundle: Bundle) -> bytes:
            with tls_client(test_pki, server.port, bundle) as sock:
                return sock.recv(2)

        assert await asyncio.to_thread(hello, test_pki.device) == b"hi"
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await asyncio.to_thread(hello, test_pki.revoked)
        assert server.refused == [HANDSHAKE_FAILED]
        assert server.calls == 1


# -- closing -------------------------------------------------------------------------------
async def test_close_sends_close_notify(test_pki: TestPki) -> None:
    closed = asyncio.Event()

    async def bye(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"bye")
        writer.close()
        await writer.wait_closed()
        closed.set()

    async with serving(bye, server_ctx(test_pki)) as server:

        def client() -> tuple[bytes, bytes]:
            with tls_client(test_pki, server.port, test_pki.device) as sock:
                # a ragged EOF (no close_notify) raises SSLEOFError here instead of b""
                return read_all(sock, 3), sock.recv(10)

        first, after = await asyncio.to_thread(client)
        assert first == b"bye"
        assert after == b""
        await asyncio.wait_for(closed.wait(), 5)


async def test_abort_drops_at_once(test_pki: TestPki) -> None:
    dropped = asyncio.Event()

    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(4)
        writer.transport.abort()
        assert writer.is_closing()
        await writer.wait_closed()
        dropped.set()

    async with serving(drop, server_ctx(test_pki)) as server:

        def client() -> bytes:
            with tls_client(test_pki, server.port, test_pki.device) as sock:
                sock.sendall(b"ping")
                return sock.recv(10)

        # no close_notify: the client sees a ragged EOF or a reset, not a clean end (b"")
        with pytest.raises((ssl.SSLEOFError, ConnectionError)):
            await asyncio.to_thread(client)
        await asyncio.wait_for(dropped.wait(), 5)
        assert server.errors == []


async def test_close_gives_up_on_a_client_that_does_not_read(test_pki: TestPki) -> None:
    closed: list[float] = []

    async def stuck(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        chunk = b"x" * (64 * 1024)
        while writer.transport.get_write_buffer_size() < 512 * 1024:  # past the kernel's
            writer.write(chunk)
            await asyncio.sleep(0)
        start = time.monotonic()
        writer.close()  # cannot flush: the client reads nothing
        await writer.wait_closed()
        closed.append(time.monotonic() - start)

    async with serving(stuck, server_ctx(test_pki), close_timeout=0.5) as server:
        sock = await asyncio.to_thread(
            tls_client, test_pki, server.port, test_pki.device, rcvbuf=64 * 1024
        )
        with sock:
            await until(lambda: bool(closed))
        assert 0.4 <= closed[0] < 5  # aborted after close_timeout, not left open


@pytest.mark.parametrize("how", ["close_notify", "ragged"])
async def test_the_reader_sees_eof_mid_read(test_pki: TestPki, how: str) -> None:
    partial: list[bytes] = []

    async def expect_ten(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"go")
        try:
            await reader.readexactly(10)
        except asyncio.IncompleteReadError as exc:
            partial.append(exc.partial)

    async with serving(expect_ten, server_ctx(test_pki)) as server:

        def client() -> None:
            sock = tls_client(test_pki, server.port, test_pki.device)
            try:
                # read first: a socket closed with unread data (TLS 1.3 session tickets)
                # sends a reset, not an EOF
                assert read_all(sock, 2) == b"go"
                sock.sendall(b"abc")
                if how == "close_notify":
                    sock.unwrap().close()
            finally:
                sock.close()

        await asyncio.to_thread(client)
        await until(lambda: partial == [b"abc"])


# -- flow control --------------------------------------------------------------------------
async def test_drain_waits_while_the_client_does_not_read(test_pki: TestPki) -> None:
    high, chunk, total = 256 * 1024, 64 * 1024, 32 * MiB
    data = pattern(total)
    progress = {"written": 0, "max_buffer": 0}
    transports: list[asyncio.WriteTransport] = []

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        transport = writer.transport
        transport.set_write_buffer_limits(high=high)
        transports.append(transport)
        for start in range(0, total, chunk):
            writer.write(data[start : start + chunk])
            progress["written"] += chunk
            size = transport.get_write_buffer_size()
            progress["max_buffer"] = max(progress["max_buffer"], size)
            await writer.drain()
        await reader.read()

    async with serving(flood, server_ctx(test_pki)) as server:
        sock = await asyncio.to_thread(
            tls_client, test_pki, server.port, test_pki.device, rcvbuf=64 * 1024
        )
        with sock:
            # the handler is inside drain(): over the high-water mark, waiting for the client
            await until(lambda: bool(transports) and transports[0].get_write_buffer_size() > high)
            # nothing is read meanwhile, so the writer stays stalled
            assert await settled(lambda: progress["written"]) < total
            received = await asyncio.to_thread(read_all, sock, total)
        assert received == data
        # one chunk over the mark at most, plus TLS framing
        assert progress["max_buffer"] <= high + chunk + 4096
        assert server.errors == []


async def test_reading_pauses_while_the_stream_reader_is_full(test_pki: TestPki) -> None:
    total = 32 * MiB
    data = pattern(total)
    go = asyncio.Event()
    transports: list[asyncio.WriteTransport] = []
    got: list[bool] = []

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        transports.append(writer.transport)
        await go.wait()
        got.append(await reader.readexactly(total) == data)

    async with serving(slow, server_ctx(test_pki)) as server:
        sent = [0]
        sock = await asyncio.to_thread(
            tls_client, test_pki, server.port, test_pki.device, sndbuf=64 * 1024
        )

        def push() -> None:
            for start in range(0, total, 64 * 1024):
                sock.sendall(data[start : start + 64 * 1024])
                sent[0] += 64 * 1024

        pusher = threading.Thread(target=push)
        pusher.start()
        try:
            await until(lambda: bool(transports) and not transports[0].is_reading())
            assert await settled(lambda: sent[0]) < total  # the client is held by TCP
            assert not transports[0].is_reading()
            go.set()
            await until(lambda: got == [True], timeout=20)
        finally:
            go.set()
            await asyncio.to_thread(pusher.join, 20)
            sock.close()
        assert server.errors == []
