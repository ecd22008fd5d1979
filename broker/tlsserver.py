"""A TLS stream server whose connections keep no large buffers: TLS on `ssl.MemoryBIO`.

asyncio's own TLS (its `SSLProtocol`) allocates and zero-fills a 256 KiB read
buffer for every accepted socket, before the handshake, for the connection's life: ~296 KiB
per idle device. Here TLS runs on `ssl.SSLContext.wrap_bio` over a plain TCP transport,
with public APIs only:

- the socket is read into one `read_size` buffer shared by every connection of the listener
  (asyncio fills it and calls `buffer_updated` in one step, and its bytes go straight into
  the connection's MemoryBIO), and plaintext is handed on in pieces of at most one TLS record;
- plaintext written is encrypted one record at a time, so OpenSSL's memory BIOs never grow
  beyond about one record (they keep their largest size);
- the SSLObject is made when the first bytes arrive, so a socket that never sends a
  ClientHello holds no TLS state;
- handshakes in progress are capped (`max_pending_handshakes`): beyond it a new socket is
  aborted before any TLS work, because the broker's connection limit only sees connections
  whose handshake is done.

The application side is asyncio's: `asyncio.StreamReaderProtocol` with a `StreamReader` and a
`StreamWriter`, exactly what `asyncio.start_server` hands its callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("broker.tls")

RECORD = 16 * 1024  # the most plaintext one TLS record carries
DEFAULT_READ_SIZE = 17 * 1024  # one full record with its header and AEAD overhead
DEFAULT_MAX_PENDING_HANDSHAKES = 2000
DEFAULT_CLOSE_TIMEOUT = 10.0
DEFAULT_LIMIT = 64 * 1024  # asyncio.start_server's StreamReader limit

ClientConnected = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
ContextSource = ssl.SSLContext | Callable[[], ssl.SSLContext]

# why a socket was dropped before the callback ran, as given to `on_refused`
HANDSHAKE_CAP = "handshake-cap"
HANDSHAKE_TIMEOUT = "handshake-timeout"
HANDSHAKE_FAILED = "handshake-failed"


async def start_tls_server(
    client_connected: ClientConnected,
    host: str | None,
    port: int,
    ssl_context: ContextSource,
    *,
    handshake_timeout: float,
    max_pending_handshakes: int = DEFAULT_MAX_PENDING_HANDSHAKES,
    read_size: int = DEFAULT_READ_SIZE,
    limit: int = DEFAULT_LIMIT,
    close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
    on_refused: Callable[[str], None] | None = None,
    reuse_address: bool = True,
    backlog: int = 100,
) -> asyncio.Server:
    """Listen like `asyncio.start_server(..., ssl=...)`; `client_connected` runs after each
    successful handshake. `ssl_context` may be a callable, evaluated per connection."""
    if max_pending_handshakes < 1 or read_size < 1 or handshake_timeout <= 0:
        raise ValueError("max_pending_handshakes, read_size and handshake_timeout must be positive")
    if isinstance(ssl_context, ssl.SSLContext):
        fixed = ssl_context

        def contexts() -> ssl.SSLContext:
            return fixed

    else:
        contexts = ssl_context
    listener = _Listener(
        client_connected,
        contexts,
        handshake_timeout=handshake_timeout,
        max_pending=max_pending_handshakes,
        buffer=memoryview(bytearray(read_size)),
        limit=limit,
        close_timeout=close_timeout,
        on_refused=on_refused,
    )
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: _TlsConnection(listener),
        host,
        port,
        reuse_address=reuse_address,
        backlog=backlog,
    )


class _Listener:
    """What every connection of one listening server shares."""

    def __init__(
        self,
        client_connected: ClientConnected,
        contexts: Callable[[], ssl.SSLContext],
        *,
        handshake_timeout: float,
        max_pending: int,
        buffer: memoryview,
        limit: int,
        close_timeout: float,
        on_refused: Callable[[str], None] | None,
    ) -> None:
        self.client_connected = client_connected
        self.contexts = contexts
        self.handshake_timeout = handshake_timeout
        self.max_pending = max_pending
        self.buffer = buffer
        self.limit = limit
        self.close_timeout = close_timeout
        self.on_refused = on_refused
        self.pending = 0  # handshakes in progress
        self.capped = 0  # sockets refused by the cap, for sparse logging

    def refused(self, reason: str, peer: object, detail: str) -> None:
        if reason == HANDSHAKE_CAP:
            self.capped += 1
            if self.capped in (1, 10, 100) or self.capped % 1000 == 0:
                log.warning(
                    "event=tls_refused reason=%s peer=%s pending=%d refused=%d",
                    reason,
                    _peer(peer),
                    self.pending,
                    self.capped,
                )
        else:
            log.debug("event=tls_refused reason=%s peer=%s detail=%r", reason, _peer(peer), detail)
        if self.on_refused is not None:
            self.on_refused(reason)


class _TlsConnection(asyncio.BufferedProtocol):
    """One accepted socket: the TCP side's protocol, and the state behind its TlsTransport."""

    # slots: tens of thousands of these may wait for a ClientHello
    __slots__ = (
        "_app",
        "_closing",
        "_eof_delivered",
        "_error",
        "_incoming",
        "_listener",
        "_loop",
        "_outgoing",
        "_peer_eof",
        "_pending",
        "_raw",
        "_reading_paused",
        "_timer",
        "_tls",
        "_writing_paused",
    )

    def __init__(self, listener: _Listener) -> None:
        self._listener = listener
        self._loop = asyncio.get_running_loop()
        self._raw: asyncio.Transport | None = None
        self._incoming: ssl.MemoryBIO | None = None
        self._outgoing: ssl.MemoryBIO | None = None
        self._tls: ssl.SSLObject | None = None
        self._app: asyncio.BaseProtocol | None = None  # once the handshake is done
        self._pending = False  # counted in listener.pending
        self._timer: asyncio.TimerHandle | None = None
        self._closing = False
        self._reading_paused = False
        self._writing_paused = False
        self._peer_eof = False  # the socket reached EOF: deliver what is left, then EOF
        self._eof_delivered = False
        self._error: Exception | None = None

    # -- the TCP side ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._raw = transport
        listener = self._listener
        if listener.pending >= listener.max_pending:
            self._closing = True
            transport.abort()
            listener.refused(HANDSHAKE_CAP, transport.get_extra_info("peername"), "")
            return
        listener.pending += 1
        self._pending = True
        self._timer = self._loop.call_later(listener.handshake_timeout, self._handshake_timed_out)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._listener.buffer

    def buffer_updated(self, nbytes: int) -> None:
        if self._closing:
            return
        if self._tls is None:
            self._incoming = ssl.MemoryBIO()
            self._outgoing = ssl.MemoryBIO()
            self._tls = self._listener.contexts().wrap_bio(
                self._incoming, self._outgoing, server_side=True
            )
        assert self._incoming is not None
        # copied out of the shared buffer before anything else can read into it
        self._incoming.write(self._listener.buffer[:nbytes])
        if self._app is None:
            self._handshake()
        if self._app is not None:
            self._decrypt()

    def eof_received(self) -> bool:
        if self._app is None:
            return False  # before the handshake: just close
        self._peer_eof = True
        self._decrypt()
        return True  # the socket closes once what is left has been delivered

    def pause_writing(self) -> None:
        self._writing_paused = True
        if self._app is not None:
            self._app.pause_writing()

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._app is not None:
            self._app.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._end_pending()
        app, self._app = self._app, None
        if app is not None:
            app.connection_lost(exc if exc is not None else self._error)

    # -- the handshake ---------------------------------------------------------------------
    def _handshake(self) -> None:
        assert self._tls is not None
        assert self._raw is not None
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except ssl.SSLError as exc:
            self._flush()  # the alert tells the client why
            self._end_pending()
            self._listener.refused(HANDSHAKE_FAILED, self._raw.get_extra_info("peername"), str(exc))
            self._shut(notify=False)
            return
        self._flush()  # the server's last flight (TLS 1.3 session tickets)
        self._end_pending()
        self._established()

    def _established(self) -> None:
        reader = asyncio.StreamReader(limit=self._listener.limit)
        app = asyncio.StreamReaderProtocol(reader, self._listener.client_connected)
        self._app = app
        app.connection_made(TlsTransport(self, app))
        if self._writing_paused:
            app.pause_writing()

    def _handshake_timed_out(self) -> None:
        self._timer = None
        if self._closing or self._raw is None:
            return
        self._end_pending()
        self._listener.refused(
            HANDSHAKE_TIMEOUT,
            self._raw.get_extra_info("peername"),
            f"no handshake in {self._listener.handshake_timeout:g} s",
        )
        self.abort()

    def _end_pending(self) -> None:
        if self._pending:
            self._pending = False
            self._listener.pending -= 1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- data ------------------------------------------------------------------------------
    def _decrypt(self) -> None:
        """Hand decrypted data to the application, one record at a time, until it pauses."""
        tls, app = self._tls, self._app
        if tls is None or not isinstance(app, asyncio.Protocol):
            return
        while not self._reading_paused and not self._closing:
            try:
                chunk = tls.read(RECORD)
            except ssl.SSLWantReadError:
                break  # all that arrived is delivered
            except ssl.SSLZeroReturnError:
                chunk = b""
            except ssl.SSLError as exc:
                self._fail(exc)
                return
            if not chunk:  # the peer's close_notify
                self._peer_eof = True
                break
            app.data_received(chunk)
        self._flush()
        if (
            self._peer_eof
            and not self._eof_delivered
            and not self._reading_paused
            and not self._closing
        ):
            # after close_notify, or the socket's EOF (a ragged one) once all is delivered
            self._eof_delivered = True
            if not app.eof_received():
                self.close()

    def _flush(self) -> None:
        """Send what OpenSSL wrote to the outgoing BIO."""
        if self._outgoing is not None and self._outgoing.pending and self._raw is not None:
            self._raw.write(self._outgoing.read())

    def _fail(self, exc: ssl.SSLError) -> None:
        assert self._raw is not None
        log.debug(
            "event=tls_error peer=%s detail=%r", _peer(self._raw.get_extra_info("peername")), exc
        )
        self._error = exc
        self._flush()
        self.abort()

    def _shut(self, *, notify: bool) -> None:
        """Close the socket after what is buffered (and a close_notify); abort if it takes
        longer than close_timeout (a peer that does not read)."""
        assert self._raw is not None
        self._closing = True
        if notify and self._tls is not None:
            # SSLWantReadError: the peer's close_notify is not awaited
            with contextlib.suppress(ssl.SSLError):
                self._tls.unwrap()
            self._flush()
        self._raw.close()
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(self._listener.close_timeout, self._raw.abort)

    # -- what TlsTransport calls -----------------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> None:
        tls, outgoing, raw = self._tls, self._outgoing, self._raw
        if self._closing or tls is None or outgoing is None or raw is None or not data:
            return
        try:
            if len(data) <= RECORD and not isinstance(data, memoryview):
                tls.write(data)  # the common case: a few MQTT packets
                raw.write(outgoing.read())
                return
            view = memoryview(data).cast("B")
            records: list[bytes] = []
            for start in range(0, len(view), RECORD):
                tls.write(view[start : start + RECORD])
                # drained per record: a memory BIO keeps the largest size it ever had
                records.append(outgoing.read())
        except ssl.SSLError as exc:
            self._fail(exc)
            return
        raw.write(b"".join(records))

    def close(self) -> None:
        if not self._closing and self._raw is not None:
            self._shut(notify=True)

    def abort(self) -> None:
        self._closing = True
        if self._raw is not None:
            self._raw.abort()

    def is_closing(self) -> bool:
        return self._closing or self._raw is None or self._raw.is_closing()

    def pause_reading(self) -> None:
        if not self._reading_paused and self._raw is not None:
            self._reading_paused = True
            self._raw.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused and self._raw is not None:
            self._reading_paused = False
            if not self._peer_eof:
                self._raw.resume_reading()
            self._loop.call_soon(self._decrypt)  # what was decrypted-to-be before the pause

    def is_reading(self) -> bool:
        return not self._reading_paused and not self.is_closing()

    def raw(self) -> asyncio.Transport:
        assert self._raw is not None
        return self._raw

    def tls(self) -> ssl.SSLObject:
        assert self._tls is not None
        return self._tls

    def set_app(self, protocol: asyncio.BaseProtocol) -> None:
        self._app = protocol


class TlsTransport(asyncio.Transport):
    """The application's transport: plaintext in and out, over one `_TlsConnection`."""

    __slots__ = ("_connection", "_protocol")

    def __init__(self, connection: _TlsConnection, protocol: asyncio.BaseProtocol) -> None:
        super().__init__()
        self._connection = connection
        self._protocol = protocol

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        tls = self._connection.tls()
        if name == "ssl_object":
            return tls
        if name == "sslcontext":
            return tls.context
        if name == "peercert":
            return tls.getpeercert()
        if name == "cipher":
            return tls.cipher()
        if name == "compression":
            return tls.compression()
        return self._connection.raw().get_extra_info(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._connection.write(data)

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise NotImplementedError("TLS does not support half-closes")

    def close(self) -> None:
        """Send close_notify (best effort, the peer's is not awaited), then close."""
        self._connection.close()

    def abort(self) -> None:
        self._connection.abort()

    def is_closing(self) -> bool:
        return self._connection.is_closing()

    def pause_reading(self) -> None:
        self._connection.pause_reading()

    def resume_reading(self) -> None:
        self._connection.resume_reading()

    def is_reading(self) -> bool:
        return self._connection.is_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._connection.raw().set_write_buffer_limits(high, low)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._connection.raw().get_write_buffer_limits()

    def get_write_buffer_size(self) -> int:
        # plaintext is encrypted as it is written: all that waits is ciphertext
        return self._connection.raw().get_write_buffer_size()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol
        self._connection.set_app(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol


def _peer(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return "?"
