"""`WebServer`: the app under uvicorn, started and stopped from a running event loop."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from certs import CertsError, Pki, Role
from core.errors import FieldlineError
from core.settings import Settings
from ingest_worker.database import connect
from ingest_worker.errors import StorageError
from ingest_worker.migrate import migrate_shared
from web.app import create_app
from web.errors import WebError
from web.slow_clients import timed_h11

log = logging.getLogger("fieldline.web")


def is_loopback(host: str) -> bool:
    """Whether `host` is a loopback name or address (plain HTTP is allowed there only)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def tls_files(settings: Settings, host: str) -> tuple[Path, Path] | None:
    """(cert, key) of the `certs server` bundle when HTTPS is due, None for plain HTTP on
    loopback; WebError saying which command issues it when it is due and missing."""
    if is_loopback(host) and settings.web.https == "auto":
        return None
    name = settings.web.server_cert
    pki = Pki(settings.pki_dir)
    try:
        # a server certificate only: a device or operator named like web.server_cert has a
        # client certificate (and its key) under the same id, which must never be served
        found = [r for r in pki.records()
                 if r.id == name and r.role is Role.SERVER and r.revoked_at is None]  # fmt: skip
    except CertsError:
        found = []
    cert = key = settings.pki_dir / "server" / name / "missing"
    if found:
        cert, key = (pki.root / found[-1].directory / f for f in ("cert.pem", "key.pem"))
    if not (cert.is_file() and key.is_file()):
        why = "listening beyond loopback" if not is_loopback(host) else "with web.https=always"
        hint = f"--ip {host}" if _is_ip(host) else f"--host {host}"
        raise WebError(
            f"{why}, the web server needs HTTPS and there is no server certificate "
            f"{name!r} in {settings.pki_dir}: run `fieldline certs server {name} {hint}` "
            "(or set web.server_cert to an existing one)"
        )
    return cert, key


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # the owner (`fieldline web run`, `fieldline up`) handles SIGINT/SIGTERM and calls stop()
        yield


class WebServer:
    """`await start()` listens (port 0: a free one, see `.port`); `await stop()` ends live
    streams, lets requests in progress finish and closes the database pools."""

    def __init__(
        self,
        settings: Settings,
        *,
        host: str | None = None,
        port: int | None = None,
        dsn: str | None = None,
    ) -> None:
        self.settings = settings
        self.host = host or settings.web.host
        self.port = settings.web.port if port is None else port
        self.dsn = dsn
        self.tls = tls_files(settings, self.host)  # refused before anything starts
        self.app = create_app(settings, dsn=dsn, metrics_open=is_loopback(self.host))
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        """Where the console is: http(s)://host:port/."""
        scheme = "https" if self.tls else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}/"

    async def start(self) -> None:
        """Apply the shared migrations (the token table), then listen."""
        await self._migrate()
        cert, key = self.tls if self.tls else (None, None)
        refused = self.app.state.web.metrics.refused
        protocol = timed_h11(self.settings.web.read_timeout_s,
                             lambda: refused.labels("slow_request").inc())  # fmt: skip
        config = uvicorn.Config(
            self.app, host=self.host, port=self.port, log_level="warning", access_log=False,
            http=protocol,
            lifespan="on", ssl_certfile=str(cert) if cert else None,
            ssl_keyfile=str(key) if key else None, timeout_graceful_shutdown=5,
            server_header=False,
        )  # fmt: skip
        self._server = _Server(config)
        self._task = asyncio.create_task(self._server.serve(), name="web-server")
        while not self._server.started:
            if self._task.done():
                error = self._task.exception() if not self._task.cancelled() else None
                raise WebError(
                    f"the web server could not listen on {self.host}:{self.port}"
                    f"{f': {error}' if error else ''} (is the port taken? set web.port)"
                )
            await asyncio.sleep(0.02)
        sockets = self._server.servers[0].sockets
        self.port = int(sockets[0].getsockname()[1])
        log.info("event=web_listening url=%s", self.url)

    async def _migrate(self) -> None:
        try:
            dsn = self.app.state.web.shared_dsn()
            conn = await connect(dsn, timeout=10)
        except (FieldlineError, StorageError) as exc:  # unreachable, or no embedded cluster
            log.warning("event=web_no_database error=%r", str(exc))  # health says unreachable
            return
        try:
            await migrate_shared(conn)
        finally:
            await conn.close()

    async def stop(self) -> None:
        """Stop listening; live streams end at once, other requests get up to 5 s."""
        if self._server is None or self._task is None:
            return
        self.app.state.web.stopping.set()
        self._server.should_exit = True
        try:
            await self._task
        finally:
            self._server = None
            self._task = None
