"""`fieldline up`: the whole pipeline on one machine, started in order and stopped in reverse.

Certificates, the embedded PostgreSQL + TimescaleDB (unless FIELDLINE_DATABASE_URL), the
broker (embedded, or Mosquitto with the rendered config), an ingest worker, an edge agent
running the machine-reset example and a simulated fleet, all under FIELDLINE_HOME, so a
second `fieldline up` continues with the same data.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import asyncpg

from broker.errors import BrokerError
from broker.mosquitto import MosquittoOptions, write_mosquitto_files
from broker.nats import (
    NatsOptions,
    StreamLimits,
    check_server,
    ensure_stream_when_ready,
    write_nats_files,
)
from broker.service import BrokerService, crl_renewer, options_from_settings
from certs import Pki, Role
from certs.context import client_context
from certs.crl import RENEW_HINT
from core.errors import FieldlineError
from core.pgcluster import EmbeddedPostgres, cluster
from core.settings import Settings
from device_runtime.intake import ReplayPolicy
from edge_agent.agent import AgentOptions, EdgeAgent
from edge_agent.manifest import parse_manifest
from fleet.errors import NotFoundError
from fleet.series import latest_values, recent_rows
from ingest_worker.database import connect
from ingest_worker.migrate import migrate_all, quote_ident, tenant_schema
from ingest_worker.service import IngestWorker, worker_config
from simulator.fleet import Fleet, FleetConfig, bundle_dirs, device_ids
from web import tokens
from web.server import WebServer
from web.tokens import TokenRole

log = logging.getLogger("fieldline.up")

AGENT_ID = "gw-1"
# the identity of the printed `mosquitto_sub` line: the client id is the certificate's CN, so
# sharing the CLI's operator identity made the two take the session from each other
WATCHER_ID = "watcher"
# the console of `fieldline up` listens on loopback only, with an operator token on disk
WEB_HOST = "127.0.0.1"
WEB_TOKEN_FILE = "web-token"  # noqa: S105 - a file name, not a secret


@dataclass
class StackOptions:
    """What `fieldline up` runs."""

    tenant: str = "demo"
    devices: int = 20
    interval_s: float = 1.0
    broker: str = "embedded"  # or "mosquitto", or "nats"
    nodes: int = 3  # nats: nodes of the cluster


@dataclass
class View:
    """What the live view shows, refreshed from the database and the services."""

    rows: float = 0.0
    rows_per_s: float = 0.0
    online: int = 0
    devices: int = 0
    latest: dict[str, dict[str, float]] = field(default_factory=dict)
    alerts: list[tuple[str, str, str]] = field(default_factory=list)
    commands: list[tuple[str, str, str, str]] = field(default_factory=list)


def ensure_certificates(settings: Settings, tenant: str) -> Pki:
    """The CA and the identities the stack needs; existing ones are kept."""
    pki = Pki(settings.pki_dir, settings.certs.crl_validity_days)
    if not pki.exists():
        pki.init_ca(name="fieldline local CA")
    web_id = settings.web.operator_identity.replace("{tenant}", tenant)
    have = pki.bundles([settings.broker.server_cert, settings.ingest.identity,
                        settings.operator, AGENT_ID, WATCHER_ID, web_id])  # fmt: skip
    if settings.broker.server_cert not in have:
        pki.issue_server(settings.broker.server_cert, hosts=["localhost"], ips=["127.0.0.1"])
    if settings.ingest.identity not in have:
        pki.issue(settings.ingest.identity, tenant="platform", role=Role.SERVICE)
    if settings.operator not in have:
        pki.issue(settings.operator, tenant=tenant, role=Role.OPERATOR)
    if AGENT_ID not in have:
        pki.issue(AGENT_ID, tenant=tenant, role=Role.DEVICE)
    if web_id not in have:  # the web console sends this tenant's commands as it
        pki.issue(web_id, tenant=tenant, role=Role.OPERATOR)
    watcher = have.get(WATCHER_ID)
    if watcher is not None and watcher.identity.role is not Role.OPERATOR:
        raise FieldlineError(
            f"the id {WATCHER_ID!r}, which `fieldline up` gives its mosquitto_sub line, is a "
            f"{watcher.identity.role.value} of tenant {watcher.identity.tenant}: use another "
            "FIELDLINE_HOME, or revoke it"
        )
    if watcher is None or watcher.identity.tenant != tenant:
        # a stack started with another --tenant: the watcher follows it (it holds no state)
        pki.issue(WATCHER_ID, tenant=tenant, role=Role.OPERATOR, force=watcher is not None)
    return pki


def demo_manifest(settings: Settings, tenant: str) -> dict[str, Any]:
    """The shipped machine-reset example, as this stack's agent: its tenant and broker."""
    text = resources.files("edge_agent").joinpath("examples/machine-reset.toml").read_text()
    data = tomllib.loads(text)
    data["agent"] = {"id": AGENT_ID, "tenant": tenant}
    data["broker"] = {"host": settings.broker.host, "port": settings.broker.port}
    return data


def ports_free(s: Settings, extra: list[tuple[str, int, str]] | None = None) -> None:
    """Raise FieldlineError naming the setting if a port the stack listens on is taken."""
    wanted = [*(extra or []),
        (s.broker.bind, s.broker.port, "broker.port (FIELDLINE_BROKER__PORT)"),
        (s.broker.metrics_bind, s.broker.metrics_port,
         "broker.metrics_port (FIELDLINE_BROKER__METRICS_PORT, 0 for none)"),
        (s.ingest.metrics_bind, s.ingest.metrics_port,
         "ingest.metrics_port (FIELDLINE_INGEST__METRICS_PORT, 0 for none)"),
        (WEB_HOST, s.web.port, "web.port (FIELDLINE_WEB__PORT, 0 for a free one)"),
    ]  # fmt: skip
    for host, port, setting in wanted:
        if port == 0:
            continue
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            # as the servers bind: a port in TIME_WAIT is free, one with a listener is not
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                raise FieldlineError(
                    f"port {port} on {host} is not free ({exc.strerror}): another broker or "
                    f"`fieldline up`? Stop it, or set {setting} to a free port"
                ) from None


class LocalStack:
    """`await start()` brings everything up; `await stop()` takes it down in reverse."""

    def __init__(self, settings: Settings, options: StackOptions) -> None:
        if options.broker == "nats":
            settings = nats_stack_settings(settings, options.nodes)
        self.settings = settings
        self.options = options
        self.pg: EmbeddedPostgres | None = None
        self.dsn = settings.database_url or ""
        self.broker: BrokerService | None = None
        self.mosquitto: subprocess.Popen[bytes] | None = None
        self.nats: list[subprocess.Popen[bytes]] = []
        self.worker: IngestWorker | None = None
        self.agent: EdgeAgent | None = None
        self.fleet: Fleet | None = None
        self.web: WebServer | None = None
        self.web_token_file = settings.home / WEB_TOKEN_FILE
        self._fleet_task: asyncio.Task[Any] | None = None
        self._crl_task: asyncio.Task[None] | None = None
        self.view = View()
        self._last_rows: tuple[float, float] | None = None

    async def start(self) -> None:
        s, o = self.settings, self.options
        # before anything starts: a taken port is one line, not a half-started stack
        ports_free(s, nats_ports(s) if o.broker == "nats" else None)
        pki = ensure_certificates(s, o.tenant)
        replay = ReplayPolicy(**s.commands.model_dump())
        config = FleetConfig(
            tenant=o.tenant, devices=o.devices, interval_s=o.interval_s, prefix="sim",
            host=s.broker.host, port=s.broker.port, kind="arma", replay=replay,
        )  # fmt: skip
        dirs = bundle_dirs(device_ids(config), o.tenant, pki=pki, certs_dir=None)
        if not s.database_url:
            self.pg = cluster(s)
            await self.pg.start()
            self.dsn = self.pg.dsn()
        conn = await connect(self.dsn, timeout=15)
        try:
            await migrate_all(conn)
        finally:
            await conn.close()
        await self._start_broker(pki)
        self.worker = IngestWorker(worker_config(s.model_copy(update={"database_url": self.dsn})))
        await self.worker.start()
        await self.worker.wait_connected(30)
        manifest = parse_manifest(demo_manifest(s, o.tenant), "the demo's machine-reset agent")
        self.agent = EdgeAgent(manifest, AgentOptions(home=s.home, commands=replay))
        await self.agent.start()
        self.fleet = Fleet(config, dirs, s.home / "sim")
        await self.fleet.start(timeout=60)
        self._fleet_task = asyncio.create_task(self.fleet.run(), name="up-fleet")
        await demo_token(self.dsn, self.web_token_file, o.tenant)
        # loopback only: plain HTTP is allowed there, and the demo token is on disk
        web_settings = s.model_copy(update={"web": s.web.model_copy(update={"https": "auto"})})
        self.web = WebServer(web_settings, host=WEB_HOST, dsn=self.dsn)
        await self.web.start()

    async def _start_broker(self, pki: Pki) -> None:
        s = self.settings
        if self.options.broker == "mosquitto":
            data = s.home / "mosquitto-data"
            data.mkdir(parents=True, exist_ok=True)
            # started as root, Mosquitto drops to its own account: the files must be its
            run_as = _mosquitto_account()
            if run_as is not None:
                os.chown(data, run_as[1], run_as[2])
            options = MosquittoOptions(
                bind=s.broker.bind, port=s.broker.port, persistence_dir=data,
                run_as=run_as[0] if run_as else None, log_dest="stderr",
                autosave_interval=s.broker.mosquitto_autosave_interval,
                autosave_on_changes=s.broker.mosquitto_autosave_on_changes,
            )  # fmt: skip
            renewer = crl_renewer(s)
            if renewer is not None:
                await asyncio.to_thread(renewer.check)  # before Mosquitto copies the CRL
            files = write_mosquitto_files(pki, s.home / "mosquitto", options=options)
            self.mosquitto = proc = _spawn(
                ["mosquitto", "-c", str(files.config)], s.home / "mosquitto.log"
            )
            await asyncio.sleep(0.5)
            if self.mosquitto.poll() is not None:
                raise FieldlineError(
                    f"Mosquitto exited at once; see {s.home / 'mosquitto.log'} (is port "
                    f"{s.broker.port} taken?)"
                )
            if renewer is not None:
                out = s.home / "mosquitto"
                self._crl_task = asyncio.create_task(
                    renewer.run(lambda _new: reload_mosquitto(pki, out, options, proc)),
                    name="up-crl-renewal",
                )
        elif self.options.broker == "nats":
            await self._start_nats(pki)
        else:
            self.broker = BrokerService(
                options_from_settings(s),
                s.broker.metrics_port,
                s.broker.metrics_bind,
                crl_renewer=crl_renewer(s),
            )
            await self.broker.start()

    async def _start_nats(self, pki: Pki) -> None:
        """N nats-server processes from the rendered configs; the FIELDLINE stream ensured with
        the ingest worker's own certificate (it may create and update that stream only)."""
        s, n = self.settings, self.settings.nats
        binary = shutil.which("nats-server")
        if binary is None:
            raise FieldlineError("nats-server is not installed: `make setup` installs it")
        try:
            check_server(binary)
        except BrokerError as exc:
            raise FieldlineError(str(exc)) from None
        options = NatsOptions(
            nodes=n.nodes, hosts=(n.host,), mqtt_port=n.mqtt_port, client_port=n.client_port,
            cluster_port=n.cluster_port, server_bundle_name=s.broker.server_cert,
        )  # fmt: skip
        files = write_nats_files(pki, s.home / "nats", options)
        for k, config in enumerate(files.configs, start=1):
            self.nats.append(_spawn([binary, "-c", str(config)], s.home / f"nats-{k}.log"))
        context = client_context(pki.bundle(s.ingest.identity).directory)
        urls = [f"tls://{n.host}:{options.port(n.client_port, k)}" for k in range(1, n.nodes + 1)]
        limits = StreamLimits.from_settings(n, options.replicas)
        try:
            await ensure_stream_when_ready(urls, context, limits, timeout=60)
        except BrokerError as exc:
            dead = [k for k, proc in enumerate(self.nats, start=1) if proc.poll() is not None]
            where = f"; node(s) {dead} exited, see {s.home}/nats-K.log" if dead else ""
            raise FieldlineError(f"{exc}{where}") from None

    async def stop(self) -> None:
        """Fleet, agent, worker (drains), broker, database: each stopped even if one fails."""
        steps: list[tuple[str, Any]] = []
        if self.web is not None:
            steps.append(("web server", self.web.stop()))
        if self.fleet is not None:
            self.fleet.request_stop()
            if self._fleet_task is not None:
                steps.append(("fleet run", self._fleet_task))
            steps.append(("fleet", self.fleet.stop()))
        if self.agent is not None:
            steps.append(("edge agent", self.agent.stop(flush_s=5)))
        if self.worker is not None:
            steps.append(("ingest worker", self.worker.stop()))
        if self.broker is not None:
            steps.append(("broker", self.broker.stop()))
        if self._crl_task is not None:
            self._crl_task.cancel()
            steps.append(("CRL renewal", asyncio.gather(self._crl_task, return_exceptions=True)))
        for what, step in steps:
            try:
                await step
            except Exception as exc:  # one failing part must not keep the others running
                log.warning("event=stop_failed part=%s error=%r", what, str(exc))
        if self.mosquitto is not None:
            self.mosquitto.terminate()
            await asyncio.to_thread(self.mosquitto.wait, 10)
        for proc in self.nats:
            proc.terminate()
        for proc in self.nats:
            try:
                await asyncio.to_thread(proc.wait, 15)
            except subprocess.TimeoutExpired:
                proc.kill()
        if self.pg is not None:
            await self.pg.stop()

    async def refresh(self) -> View:
        """Update the view from the database (and the fleet)."""
        v = self.view
        schema = quote_ident(tenant_schema(self.options.tenant))
        conn = await connect(self.dsn, timeout=5)
        try:
            # numeric values are read through fleet.series only (hot + compacted rows)
            v.rows = float(await recent_rows(conn, self.options.tenant, 10))
            v.rows_per_s = v.rows / 10
            latest = await latest_values(conn, self.options.tenant)
            v.latest = {d: {k: x.value for k, x in m.items()} for d, m in latest.items()}
            v.devices = int(await conn.fetchval(f"SELECT count(*) FROM {schema}.devices"))  # noqa: S608
            v.online = int(await conn.fetchval(
                f"SELECT count(*) FROM {schema}.devices WHERE status = 'online'"  # noqa: S608
            ))  # fmt: skip
            v.alerts = [
                (r["time"].strftime("%H:%M:%S"), r["device_id"], r["kind"])
                for r in await conn.fetch(
                    f"SELECT time, device_id, kind FROM {schema}.events "  # noqa: S608
                    "WHERE kind <> 'presence' ORDER BY time DESC LIMIT 5"
                )
            ]
            v.commands = [
                (r["updated_at"].strftime("%H:%M:%S"), r["device_id"], r["name"], r["status"])
                for r in await conn.fetch(
                    f"SELECT updated_at, device_id, name, status FROM {schema}.commands "  # noqa: S608
                    "ORDER BY updated_at DESC LIMIT 5"
                )
            ]
        except (asyncpg.UndefinedTableError, NotFoundError):
            pass  # the tenant's schema comes with its first message
        except asyncpg.PostgresError as exc:
            # the live view is a window on the pipeline, never a reason to stop it: the view
            # stays as it was until the next refresh
            log.warning("event=view_refresh_failed error=%r", str(exc))
        finally:
            await conn.close()
        return v


async def demo_token(dsn: str, path: Path, tenant: str) -> Path:
    """An operator token of the demo tenant in `path` (0600), created once: kept while it is
    valid, replaced when revoked or when the database no longer knows it."""
    conn = await connect(dsn, timeout=15)
    try:
        existing = _read_token(path)
        if existing is not None:
            token = await tokens.verify(conn, existing)
            if token is not None and token.tenant == tenant:
                return path
        _record, text = await tokens.create_token(
            conn, TokenRole.OPERATOR, tenant, f"fieldline up ({tenant})"
        )
    finally:
        await conn.close()
    _write_token(path, text)
    return path


def _read_token(path: Path) -> str | None:
    return path.read_text().strip() if path.is_file() else None


def _write_token(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text + "\n")
    path.chmod(0o600)  # an existing file keeps its mode through O_CREAT


def reload_mosquitto(
    pki: Pki, out_dir: Path, options: MosquittoOptions, proc: subprocess.Popen[bytes]
) -> bool:
    """Mosquitto reads a private copy of the CRL: render its files again, then SIGHUP it (it
    re-reads the CRL and the ACL without dropping anyone). False when that failed (logged)."""
    if proc.poll() is not None:
        return False
    try:
        files = write_mosquitto_files(pki, out_dir, options=options)
    except (BrokerError, OSError) as exc:
        log.error("event=mosquitto_render_failed error=%r hint='%s'", str(exc), RENEW_HINT)
        return False
    proc.send_signal(signal.SIGHUP)
    log.info("event=mosquitto_reloaded reason=crl_renewed crl=%s", files.crl)
    return True


def nats_stack_settings(settings: Settings, nodes: int) -> Settings:
    """The settings of a stack on a NATS cluster: node 1's MQTT port is broker.port (devices,
    the edge agent and the watch line connect there), and the worker pulls from JetStream."""
    n = settings.nats.model_copy(
        update={"nodes": nodes, "host": "127.0.0.1", "mqtt_port": settings.broker.port}
    )
    i = settings.ingest.model_copy(update={"source": "nats"})
    return settings.model_copy(update={"nats": n, "ingest": i})


def nats_ports(s: Settings) -> list[tuple[str, int, str]]:
    """Every port the cluster's nodes listen on, with the setting that moves it."""
    n = s.nats
    bases = [(s.broker.port, "broker.port (FIELDLINE_BROKER__PORT)"),
             (n.client_port, "nats.client_port (FIELDLINE_NATS__CLIENT_PORT)"),
             (n.cluster_port, "nats.cluster_port (FIELDLINE_NATS__CLUSTER_PORT)")]  # fmt: skip
    return [(n.host, base + k, setting) for base, setting in bases for k in range(n.nodes)]


def _spawn(argv: list[str], log_file: Path) -> subprocess.Popen[bytes]:
    with log_file.open("ab") as log:
        return subprocess.Popen(argv, stdout=log, stderr=log)


def _mosquitto_account() -> tuple[str, int, int] | None:
    """(name, uid, gid) of the account Mosquitto runs as when started by root, else None."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam("mosquitto")
    except KeyError:
        return None  # no such account: Mosquitto stays root, and reads root's files
    return entry.pw_name, entry.pw_uid, entry.pw_gid


def watch_command(settings: Settings, tenant: str) -> str:
    """A ready-to-paste `mosquitto_sub` as the stack's watcher, not the CLI's operator."""
    bundle = settings.pki_dir / "issued" / WATCHER_ID
    return (
        f"mosquitto_sub -h {settings.broker.host} -p {settings.broker.port} "
        f"-i {WATCHER_ID} --cafile {bundle / 'ca.pem'} --cert {bundle / 'cert.pem'} "
        f"--key {bundle / 'key.pem'} -t 'fl/{tenant}/#' -v"
    )
