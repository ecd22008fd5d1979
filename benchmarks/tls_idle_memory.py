"""What an idle TLS connection costs an asyncio server, with asyncio's read buffer and without.

    python -m benchmarks.tls_idle_memory              # 2,000 connections, 2 rounds (~1.5 min)
    python -m benchmarks.tls_idle_memory --no-hello   # also sockets never starting TLS (~2 min)
    python -m benchmarks.tls_idle_memory --connections 5000 --rounds 3
    python -m benchmarks.tls_idle_memory --throughput       # MB/s of one connection (~1 min)

Python 3.11's asyncio gives every TLS connection an `SSLProtocol` whose `__init__` allocates
`bytearray(SSLProtocol.max_size)` (256 KiB) as its read buffer, for the connection's life,
from the moment the TCP connection is accepted. `bytearray(n)` zero-fills, so every page is
written and resident whether glibc serves it from mmap or from the heap.

Each run starts a fresh server process holding `--connections` connections from another
process, then reads the server's VmRSS (/proc/PID/status) and Pss and Private_Dirty
(/proc/PID/smaps_rollup) once it listens and again once every connection has delivered its
message and sat idle for `--settle` seconds. The TLS context is the embedded broker's own
(`broker.tls.server_context`: TLS 1.2+, client certificate required, CRL checked); each
client completes the handshake with a device certificate, writes one message (300 bytes,
an MQTT CONNECT's size, or 16 KiB) and idles; the server's handler reads the message and
waits for EOF, as a broker does with an idle device. Server variants, in alternating order
each round:

- `asyncio.start_server` with asyncio's default `max_size`;
- the same with `max_size` set to 32 KiB in that server process only (measurement, not
  product code: this is what broker/server.py's `_trim_tls_buffers` did process-wide);
- TLS on `ssl.MemoryBIO` over a plain TCP transport (`MemoryBioTls`, a sketch): what a
  read size chosen per connection, with public APIs only, would cost;
- `broker.tlsserver.start_tls_server`, called as the broker calls it (its callback, the
  broker's context, a handshake timeout of `connect_timeout_s`' default).

`--throughput` measures instead one connection carrying `--throughput-mib` MiB each way
(client to server, then server to client), through asyncio's TLS and through
`start_tls_server`: MB/s on the wall clock and the server's CPU seconds per GiB. The client
is a blocking `ssl` socket in the parent process; the server is a fresh child per run.

`--no-hello` adds clients that open TCP connections and never send a ClientHello, which
anyone can do without a certificate. Kernel socket memory is not in these figures.
Certificates come from benchmarks.broker_memory's PKI (.fieldline/bench-memory/pki).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import resource
import socket
import ssl
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMALL = 32 * 1024
TLS_RECORD = 16 * 1024  # the most plaintext one TLS record carries
DEVICE = "pub-0"
BROKER_CONNECT_TIMEOUT_S = 10.0  # the broker's connect_timeout_s default


@dataclass(frozen=True)
class Variant:
    """One server configuration: asyncio's TLS with its read-buffer size (None: asyncio's
    own) or TLS on MemoryBIO (`bio`), and the message size (0: the clients connect over TCP
    and never send a ClientHello)."""

    max_size: int | None
    message: int
    bio: bool = False
    own: bool = False  # broker.tlsserver.start_tls_server

    @property
    def label(self) -> str:
        size = "default" if self.max_size is None else f"{self.max_size // 1024} KiB"
        tls = "own TLS on MemoryBIO" if self.bio else f"asyncio, max_size {size}"
        if self.own:
            tls = "broker.tlsserver"
        what = "no ClientHello" if not self.message else f"{self.message:,} B message"
        return f"{tls:25} {what:>16}"


@dataclass(frozen=True)
class Memory:
    """One reading of a process's memory, in KiB."""

    rss: int
    pss: int
    private_dirty: int


@dataclass(frozen=True)
class Result:
    variant: Variant
    effective_max_size: int
    before: Memory
    idle: Memory
    connect_seconds: float

    def per_connection(self, field: str, connections: int) -> float:
        """KiB per connection that `field` grew by between the two readings."""
        return (getattr(self.idle, field) - getattr(self.before, field)) / connections


@dataclass(frozen=True)
class Files:
    """The PEM files, as strings so they cross into spawned processes as they are."""

    ca: str
    server_cert: str
    server_key: str
    crl: str | None
    client_cert: str
    client_key: str


def memory(pid: int) -> Memory:
    """VmRSS from /proc/PID/status, Pss and Private_Dirty from /proc/PID/smaps_rollup."""
    fields: dict[str, int] = {}
    for name in ("status", "smaps_rollup"):
        for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if len(parts) == 2 and parts[1] == "kB":
                fields[key] = int(parts[0])
    return Memory(fields["VmRSS"], fields["Pss"], fields["Private_Dirty"])


def raise_fd_limit(needed: int) -> None:
    """Raise the soft RLIMIT_NOFILE to what the run needs (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise SystemExit(
            f"this run needs {needed} file descriptors per process and the hard limit is {hard}: "
            "lower --connections or raise `ulimit -Hn`"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


# -- the server process ------------------------------------------------------------------
class MemoryBioTls(asyncio.Protocol):
    """Server TLS on ssl.MemoryBIO over a plain TCP transport: what "the TLS read size set per
    connection" could look like. It keeps no read buffer: SSLObject.read returns bytes.
    A sketch for measuring (no handshake timeout, no close_notify, no write flow control)."""

    def __init__(
        self,
        context: ssl.SSLContext,
        on_ready: Callable[[asyncio.StreamReader, asyncio.Transport], None],
    ) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._on_ready = on_ready
        self._reader: asyncio.StreamReader | None = None
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        assert self._transport is not None
        self._incoming.write(data)
        try:
            if self._reader is None:
                self._tls.do_handshake()
                self._reader = asyncio.StreamReader()
                self._on_ready(self._reader, self._transport)
            while chunk := self._tls.read(TLS_RECORD):
                self._reader.feed_data(chunk)
            self._reader.feed_eof()  # close_notify
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError:
            self._transport.abort()
        finally:
            if self._outgoing.pending:
                self._transport.write(self._outgoing.read())

    def connection_lost(self, exc: Exception | None) -> None:
        if self._reader is not None:
            self._reader.feed_eof()


def server_main(files: Files, variant: Variant, expect: int, pipe: Connection) -> None:
    """Listen with TLS, tell the parent the port, report when `expect` messages are in."""
    if variant.max_size is not None:
        # measurement only: this process is the variant with a smaller read buffer
        asyncio.sslproto.SSLProtocol.max_size = variant.max_size
    asyncio.run(serve(files, variant, expect, pipe))


def _server_context(files: Files) -> ssl.SSLContext:
    """The broker's own TLS context for the benchmark's server."""
    from broker.tls import server_context

    return server_context(
        Path(files.ca),
        Path(files.server_cert),
        Path(files.server_key),
        Path(files.crl) if files.crl else None,
    )


async def serve(files: Files, variant: Variant, expect: int, pipe: Connection) -> None:
    context = _server_context(files)
    loop = asyncio.get_running_loop()
    # the thread that waits for "stop" exists before the first reading, so it is not counted
    stop = loop.run_in_executor(None, pipe.recv)
    received = 0
    all_in = asyncio.Event()
    handlers: dict[asyncio.Task[None], asyncio.BaseTransport] = {}

    async def handle(reader: asyncio.StreamReader, transport: asyncio.BaseTransport) -> None:
        nonlocal received
        task = asyncio.current_task()
        assert task is not None
        handlers[task] = transport
        try:
            await reader.readexactly(variant.message)
            received += 1
            if received == expect:
                all_in.set()
            await reader.read()  # idle until the client goes
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            transport.close()
            del handlers[task]

    async def handle_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await handle(reader, writer.transport)

    def start_handler(reader: asyncio.StreamReader, transport: asyncio.Transport) -> None:
        handlers[asyncio.ensure_future(handle(reader, transport))] = transport

    server: asyncio.AbstractServer
    if variant.own:
        from broker.tlsserver import DEFAULT_MAX_PENDING_HANDSHAKES, start_tls_server

        # as broker/server.py would call it; the cap is raised only so that --no-hello
        # measures every socket instead of refusing those over the default
        server = await start_tls_server(
            handle_stream,
            "127.0.0.1",
            0,
            context,
            handshake_timeout=BROKER_CONNECT_TIMEOUT_S,
            max_pending_handshakes=max(DEFAULT_MAX_PENDING_HANDSHAKES, expect + 1),
            backlog=1024,
        )
    elif variant.bio:
        server = await loop.create_server(
            lambda: MemoryBioTls(context, start_handler), "127.0.0.1", 0, backlog=1024
        )
    else:
        server = await asyncio.start_server(
            handle_stream, "127.0.0.1", 0, ssl=context, backlog=1024
        )
    port = server.sockets[0].getsockname()[1]
    pipe.send(("ready", port, asyncio.sslproto.SSLProtocol.max_size))
    waiter = asyncio.ensure_future(all_in.wait())
    await asyncio.wait({waiter, stop}, return_when=asyncio.FIRST_COMPLETED)
    if all_in.is_set():
        pipe.send(("idle", received))
        await stop
    waiter.cancel()
    server.close()
    # end every connection so each handler returns on its own (no cancelled-task noise)
    for transport in list(handlers.values()):
        assert isinstance(transport, asyncio.Transport)
        transport.abort()
    await asyncio.gather(*handlers, return_exceptions=True)


# -- the client process ------------------------------------------------------------------
def client_main(files: Files, port: int, count: int, message: int, pipe: Connection) -> None:
    """Open `count` TLS connections, write `message` bytes on each, idle until told
    (message 0: TCP connections that never start TLS)."""
    context = ssl.create_default_context(cafile=files.ca)
    context.load_cert_chain(files.client_cert, files.client_key)
    payload = b"\x10" + b"x" * (message - 1)

    def connect(_i: int) -> socket.socket:
        raw = socket.create_connection(("127.0.0.1", port), 30)
        if not message:
            return raw
        sock = context.wrap_socket(raw, server_hostname="localhost")
        sock.sendall(payload)
        return sock

    try:
        # a few threads so handshakes overlap with the server's (OpenSSL releases the GIL)
        with ThreadPoolExecutor(4) as pool:
            sockets = list(pool.map(connect, range(count)))
    except OSError as exc:
        pipe.send(("error", f"client: {exc}"))
        return
    pipe.send(("connected", len(sockets)))
    pipe.recv()
    for sock in sockets:
        sock.close()


# -- one measurement ---------------------------------------------------------------------
def receive(pipes: list[Connection], deadline: float) -> tuple[Connection, tuple[object, ...]]:
    """The next message from any of `pipes`; SystemExit on an error message or the deadline."""
    ready = wait(pipes, max(0.0, deadline - time.monotonic()))
    if not ready:
        raise SystemExit("timed out waiting for the server or the clients")
    pipe = ready[0]
    assert isinstance(pipe, Connection)
    try:
        message = pipe.recv()
    except EOFError:
        raise SystemExit("a benchmark process died; see its output above") from None
    if message[0] == "error":
        raise SystemExit(str(message[1]))
    return pipe, message


def run_once(files: Files, variant: Variant, connections: int, settle: float) -> Result:
    ctx = mp.get_context("spawn")
    server_pipe, server_end = ctx.Pipe()
    client_pipe, client_end = ctx.Pipe()
    server = ctx.Process(
        target=server_main,
        args=(files, variant, connections, server_end),
    )
    server.start()
    client: mp.process.BaseProcess | None = None
    try:
        _pipe, ready = receive([server_pipe], time.monotonic() + 30)
        _tag, port, effective = ready
        assert isinstance(port, int)
        assert isinstance(effective, int)
        time.sleep(settle)
        assert server.pid is not None
        before = memory(server.pid)
        fds = len(os.listdir(f"/proc/{server.pid}/fd"))
        start = time.monotonic()
        client = ctx.Process(
            target=client_main, args=(files, port, connections, variant.message, client_end)
        )
        client.start()
        deadline = start + 120
        # without a ClientHello the handler never runs: wait for the accepted sockets instead
        wanted = {"idle", "connected"} if variant.message else {"connected"}
        seen: set[str] = set()
        while seen != wanted:
            _pipe, message = receive([server_pipe, client_pipe], deadline)
            seen.add(str(message[0]))
        while len(os.listdir(f"/proc/{server.pid}/fd")) < fds + connections:
            if time.monotonic() > deadline:
                raise SystemExit("the server did not accept every connection in time")
            time.sleep(0.05)
        elapsed = time.monotonic() - start
        time.sleep(settle)
        idle = memory(server.pid)
        return Result(variant, effective, before, idle, elapsed)
    finally:
        for pipe in (client_pipe, server_pipe):
            with contextlib.suppress(OSError):  # the process may be gone already
                pipe.send("stop")
        for process in (client, server):
            if process is None:
                continue
            process.join(30)
            if process.is_alive():
                process.kill()
                process.join()


# -- throughput --------------------------------------------------------------------------
BLOCK = 1024 * 1024
UPLOAD, DOWNLOAD = b"U", b"D"


@dataclass(frozen=True)
class Transfer:
    """One connection carrying `size` bytes one way: wall seconds and the server's CPU seconds."""

    own: bool
    direction: bytes
    size: int
    wall: float
    server_cpu: float

    @property
    def label(self) -> str:
        layer = "broker.tlsserver" if self.own else "asyncio SSLProtocol"
        way = "client -> server" if self.direction == UPLOAD else "server -> client"
        return f"{layer:20} {way}"


def throughput_server_main(files: Files, own: bool, pipe: Connection) -> None:
    """Serve one transfer at a time; report the handler's CPU time per transfer."""
    asyncio.run(throughput_serve(files, own, pipe))


async def throughput_serve(files: Files, own: bool, pipe: Connection) -> None:
    from broker.tlsserver import start_tls_server

    context = _server_context(files)
    loop = asyncio.get_running_loop()
    stop = loop.run_in_executor(None, pipe.recv)
    block = bytes(BLOCK)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            # the client says which way and how much: one byte, then eight
            header = await reader.readexactly(9)
            size = int.from_bytes(header[1:], "big")
            cpu = time.process_time()
            if header[:1] == UPLOAD:
                left = size
                while left:
                    data = await reader.read(min(left, 256 * 1024))
                    if not data:
                        raise ConnectionError("the client went mid-transfer")
                    left -= len(data)
                writer.write(b"k")
            else:
                for start in range(0, size, BLOCK):
                    writer.write(block[: min(BLOCK, size - start)])
                    await writer.drain()
            await writer.drain()
            pipe.send(("cpu", time.process_time() - cpu))
            await reader.read()  # until the client closes
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            pipe.send(("error", f"server: {exc!r}"))
        finally:
            writer.close()

    server: asyncio.AbstractServer
    if own:
        server = await start_tls_server(
            handle, "127.0.0.1", 0, context, handshake_timeout=BROKER_CONNECT_TIMEOUT_S
        )
    else:
        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    pipe.send(("ready", server.sockets[0].getsockname()[1]))
    await stop
    server.close()


def throughput_client(files: Files, port: int, direction: bytes, size: int) -> float:
    """Move `size` bytes over one TLS connection; the wall seconds it took."""
    context = ssl.create_default_context(cafile=files.ca)
    context.load_cert_chain(files.client_cert, files.client_key)
    block = bytes(BLOCK)
    buffer = bytearray(256 * 1024)
    with (
        socket.create_connection(("127.0.0.1", port), 30) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as sock,
    ):
        start = time.perf_counter()
        sock.sendall(direction + size.to_bytes(8, "big"))
        if direction == UPLOAD:
            for offset in range(0, size, BLOCK):
                sock.sendall(block[: min(BLOCK, size - offset)])
            if sock.recv(1) != b"k":
                raise SystemExit("the server did not confirm the upload")
        else:
            got = 0
            while got < size:
                n = sock.recv_into(buffer)
                if not n:
                    raise SystemExit("the server closed mid-transfer")
                got += n
        return time.perf_counter() - start


def run_transfer(files: Files, own: bool, direction: bytes, size: int) -> Transfer:
    ctx = mp.get_context("spawn")
    pipe, child_end = ctx.Pipe()
    server = ctx.Process(target=throughput_server_main, args=(files, own, child_end))
    server.start()
    try:
        _pipe, ready = receive([pipe], time.monotonic() + 30)
        port = ready[1]
        assert isinstance(port, int)
        wall = throughput_client(files, port, direction, size)
        _pipe, reply = receive([pipe], time.monotonic() + 30)
        cpu = reply[1]
        assert isinstance(cpu, float)
        return Transfer(own, direction, size, wall, cpu)
    finally:
        with contextlib.suppress(OSError):
            pipe.send("stop")
        server.join(30)
        if server.is_alive():
            server.kill()
            server.join()


def throughput(files: Files, mib: int, rounds: int) -> None:
    """MB/s and server CPU per GiB of one connection, both ways, both TLS layers."""
    size = mib * 1024 * 1024
    print(
        f"Python {sys.version.split()[0]}, {ssl.OPENSSL_VERSION}; one connection, "
        f"{mib} MiB per transfer, {rounds} rounds"
    )
    print(f"\n{'round':>5}  {'transfer':37} {'MB/s':>8} {'server CPU s':>12}")
    kinds = [(own, d) for own in (False, True) for d in (UPLOAD, DOWNLOAD)]
    results: list[Transfer] = []
    for round_ in range(rounds):
        for own, direction in kinds if round_ % 2 == 0 else kinds[::-1]:
            t = run_transfer(files, own, direction, size)
            results.append(t)
            print(
                f"{round_ + 1:>5}  {t.label:37} {size / 1e6 / t.wall:>8,.0f} {t.server_cpu:>12.2f}",
                flush=True,
            )
    print(f"\n{'transfer':37} {'MB/s':>8} {'server CPU s/GiB':>16}  (medians)")
    for own, direction in kinds:
        mine = [t for t in results if t.own == own and t.direction == direction]
        rate = statistics.median(size / 1e6 / t.wall for t in mine)
        cpu = statistics.median(t.server_cpu * 1024 / mib for t in mine)
        print(f"{mine[0].label:37} {rate:>8,.0f} {cpu:>16.2f}")


# -- the report --------------------------------------------------------------------------
def kib(value: float) -> str:
    return f"{value:,.1f}"


def report(results: list[Result], connections: int) -> None:
    """Medians per variant, then what each alternative saves against asyncio's default."""
    print(
        f"\n{'variant':42} {'VmRSS KiB/conn':>14} {'Pss KiB/conn':>13} "
        f"{'Private_Dirty KiB/conn':>22} {'MiB per 1,000':>13} {'runs':>4}"
    )
    variants = list(dict.fromkeys(r.variant for r in results))
    medians: dict[Variant, float] = {}
    for variant in variants:
        mine = [r for r in results if r.variant == variant]
        rss, pss, dirty = (
            statistics.median(r.per_connection(f, connections) for r in mine)
            for f in ("rss", "pss", "private_dirty")
        )
        medians[variant] = rss
        print(
            f"{variant.label:42} {kib(rss):>14} {kib(pss):>13} {kib(dirty):>22} "
            f"{rss * 1000 / 1024:>13,.0f} {len(mine):>4}"
        )
    print(f"(medians; per connection = (idle - before) / {connections:,} connections)\n")
    for variant in variants:
        default = medians.get(Variant(None, variant.message))
        if (variant.max_size is None and not variant.bio and not variant.own) or default is None:
            continue
        saved = default - medians[variant]
        print(
            f"{variant.label}: saves {saved:,.1f} KiB per connection against asyncio's "
            f"default, {saved * 1000 / 1024:,.0f} MiB per 1,000 connections"
        )


def prepare_files() -> Files:
    from benchmarks.broker_memory import prepare_pki

    pki = prepare_pki(REPO / ".fieldline" / "bench-memory")
    server = pki.bundle("broker")
    device = pki.bundle(DEVICE)
    return Files(
        ca=str(pki.ca_cert_path),
        server_cert=str(server.cert),
        server_key=str(server.key),
        crl=str(pki.crl_path) if pki.crl_path.exists() else None,
        client_cert=str(device.cert),
        client_key=str(device.key),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--connections", type=int, default=2000, help="idle TLS connections")
    parser.add_argument("--rounds", type=int, default=2, help="runs of every variant")
    parser.add_argument("--small-message", type=int, default=300, help="bytes (CONNECT-sized)")
    parser.add_argument("--large-message", type=int, default=16 * 1024, help="bytes")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds idle before reading")
    parser.add_argument(
        "--no-hello",
        action="store_true",
        help="also connections that never send a ClientHello (what anyone can open)",
    )
    parser.add_argument(
        "--throughput",
        action="store_true",
        help="measure MB/s of one connection instead of idle memory",
    )
    parser.add_argument("--throughput-mib", type=int, default=200, help="MiB per transfer")
    args = parser.parse_args()
    if args.throughput:
        if args.throughput_mib < 1 or args.rounds < 1:
            raise SystemExit("--throughput-mib and --rounds must be positive")
        throughput(prepare_files(), args.throughput_mib, args.rounds)
        return
    if args.connections < 1 or args.rounds < 1 or min(args.small_message, args.large_message) < 1:
        raise SystemExit("--connections, --rounds and the message sizes must be positive")
    raise_fd_limit(args.connections + 256)
    files = prepare_files()
    messages = [args.small_message, args.large_message] + ([0] if args.no_hello else [])
    variants = [
        v
        for message in messages
        for v in (
            Variant(None, message),
            Variant(SMALL, message),
            Variant(None, message, True),
            Variant(None, message, own=True),
        )
    ]
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    print(
        f"Python {sys.version.split()[0]}, {ssl.OPENSSL_VERSION}, "
        f"asyncio SSLProtocol.max_size {asyncio.sslproto.SSLProtocol.max_size:,} B, "
        f"THP {thp.read_text().strip() if thp.exists() else '?'}; "
        f"{args.connections:,} connections, {args.rounds} rounds"
    )
    print(
        f"\n{'round':>5}  {'variant':42} {'before MiB':>10} {'idle MiB':>9} "
        f"{'VmRSS KiB/conn':>14} {'Pss KiB/conn':>13} {'Priv_Dirty KiB/conn':>19} {'connect s':>9}"
    )
    results = []
    for round_ in range(args.rounds):
        order = variants if round_ % 2 == 0 else variants[::-1]
        for variant in order:
            r = run_once(files, variant, args.connections, args.settle)
            results.append(r)
            n = args.connections
            print(
                f"{round_ + 1:>5}  {variant.label:42} {r.before.rss / 1024:>10,.1f} "
                f"{r.idle.rss / 1024:>9,.1f} {kib(r.per_connection('rss', n)):>14} "
                f"{kib(r.per_connection('pss', n)):>13} "
                f"{kib(r.per_connection('private_dirty', n)):>19} {r.connect_seconds:>9.1f}",
                flush=True,
            )
            if variant.max_size is not None and r.effective_max_size != variant.max_size:
                raise SystemExit(f"the server ran with max_size {r.effective_max_size}")
    report(results, args.connections)


if __name__ == "__main__":
    main()
