"""The embedded broker as a service: options from settings and the PKI, metrics over HTTP."""

from __future__ import annotations

import asyncio
import logging
import resource
import signal
from pathlib import Path
from typing import Any, TypedDict

from prometheus_client import start_http_server

from broker.errors import BrokerError
from broker.metrics import BrokerMetrics
from broker.server import BrokerOptions, FieldlineBroker
from certs import CertsError, Pki, Renewer
from core.settings import Settings, get_settings

log = logging.getLogger("broker")


class TlsFiles(TypedDict):
    """What BrokerOptions needs for TLS, as keyword arguments."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    crl_file: Path | None


def tls_files(pki_dir: Path, server_cert: str) -> TlsFiles:
    """The CA, server certificate and key, and CRL a broker serves (CertsError if absent)."""
    pki = Pki(pki_dir)
    pki.ca_certificate()
    server = pki.server_bundle(server_cert)
    return TlsFiles(
        ca_file=pki.ca_cert_path,
        cert_file=server.cert,
        key_file=server.key,
        crl_file=pki.crl_path,
    )


def options_from_settings(settings: Settings) -> BrokerOptions:
    """The broker's options: the server certificate, CA and CRL from FIELDLINE_HOME/pki."""
    b = settings.broker
    try:
        files = tls_files(settings.pki_dir, b.server_cert)
    except CertsError as exc:
        raise BrokerError(
            f"{exc}; the broker needs a CA and a server certificate: "
            f"`fieldline certs init-ca` then `fieldline certs server {b.server_cert} --host ...`"
        ) from exc
    return BrokerOptions(
        **files,
        bind=b.bind,
        port=b.port,
        max_connections=b.max_connections,
        max_subscriptions=b.max_subscriptions,
        connect_timeout_s=b.connect_timeout_s,
        max_pending_handshakes=b.max_pending_handshakes,
        max_packet_bytes=b.max_packet_bytes,
        max_inflight=b.max_inflight,
        max_queued=b.max_queued,
        service_max_inflight=b.service_max_inflight,
        service_max_queued=b.service_max_queued,
        max_inflight_bytes=b.max_inflight_bytes,
        max_queued_bytes=b.max_queued_bytes,
        service_max_inflight_bytes=b.service_max_inflight_bytes,
        service_max_queued_bytes=b.service_max_queued_bytes,
        memory_budget_bytes=b.memory_budget_bytes,
        session_expiry_s=b.session_expiry_s,
        crl_refresh_s=b.crl_refresh_s,
        store_file=store_file(settings),
        store_sync=b.store_sync,
    )


def store_file(settings: Settings) -> Path | None:
    """Where the embedded broker keeps its durable state (None: `broker.durable` is off)."""
    b = settings.broker
    if not b.durable:
        return None
    return b.store_path or settings.home / "broker" / "store.sqlite3"


def crl_renewer(settings: Settings) -> Renewer | None:
    """The CRL renewal a broker runs itself (certs.crl_auto_renew), or None."""
    c = settings.certs
    if not c.crl_auto_renew:
        return None
    return Renewer(Pki(settings.pki_dir, c.crl_validity_days), c.crl_renew_check_s)


class BrokerService:
    """`async with BrokerService(options):` runs the broker and its metrics endpoint.

    With a `crl_renewer`, it renews the CRL before starting and whenever a third of its
    validity remains; the broker's refresh loop then loads the new file.
    """

    def __init__(
        self,
        options: BrokerOptions,
        metrics_port: int = 0,
        metrics_bind: str = "127.0.0.1",
        crl_renewer: Renewer | None = None,
    ) -> None:
        self.options = options
        self.crl_renewer = crl_renewer
        self._renewal: asyncio.Task[None] | None = None
        self.metrics = BrokerMetrics()
        self.metrics_port = metrics_port
        self.metrics_bind = metrics_bind
        self.broker: FieldlineBroker | None = None
        self._http: Any = None

    async def start(self) -> None:
        if self.crl_renewer is not None:
            # before the broker reads the CRL: a stack started after a month off must not
            # begin by refusing everyone
            await asyncio.to_thread(self.crl_renewer.check)
        self.broker = FieldlineBroker(self.options, self.metrics)
        await self.broker.start()
        if self.metrics_port:
            try:
                self._http, _thread = start_http_server(
                    self.metrics_port, self.metrics_bind, registry=self.metrics.registry
                )
            except OSError as exc:
                await self.broker.shutdown()
                raise BrokerError(
                    f"cannot serve metrics on {self.metrics_bind}:{self.metrics_port}: "
                    f"{exc.strerror}; set FIELDLINE_BROKER__METRICS_PORT (0 turns metrics off)"
                ) from exc
        if self.crl_renewer is not None:
            self._renewal = asyncio.create_task(self.crl_renewer.run(), name="crl-renewal")

    async def stop(self) -> None:
        if self._renewal is not None:
            self._renewal.cancel()
            await asyncio.gather(self._renewal, return_exceptions=True)
            self._renewal = None
        if self._http is not None:
            self._http.shutdown()
            self._http = None
        if self.broker is not None:
            await self.broker.shutdown()

    async def __aenter__(self) -> BrokerService:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.stop()


def raise_file_limit(max_connections: int) -> int:
    """Every connection is a file descriptor: lift the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < max_connections:
        log.warning(
            "event=file_limit limit=%d max_connections=%d hint='raise LimitNOFILE or ulimit -n'",
            hard,
            max_connections,
        )
    return hard


async def serve(service: BrokerService) -> None:
    """Run until SIGTERM or SIGINT, then stop gracefully (the runner owns the signals)."""
    if service.crl_renewer is None:
        service.crl_renewer = crl_renewer(get_settings())
    raise_file_limit(service.options.max_connections)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with service:
        assert service.broker is not None
        metrics = (
            f" metrics=http://{service.metrics_bind}:{service.metrics_port}/metrics"
            if service.metrics_port
            else ""
        )
        log.info("event=ready port=%d%s", service.broker.port, metrics)
        await stop.wait()
        log.info("event=stopping")
