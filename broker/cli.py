"""`fieldline broker ...`: run the embedded broker, or render Mosquitto's config for production."""

from __future__ import annotations

import asyncio
from pathlib import Path

import typer

from broker.errors import BrokerError
from broker.mosquitto import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_INFLIGHT,
    DEFAULT_MAX_INFLIGHT_BYTES,
    DEFAULT_MAX_KEEPALIVE,
    DEFAULT_MEMORY_LIMIT,
    MosquittoOptions,
    QueueSizing,
    parse_duration,
    principals_from_registry,
    write_mosquitto_files,
)
from broker.nats import MIN_SERVER_VERSION, NatsOptions, write_nats_files
from broker.service import BrokerService, options_from_settings, serve
from certs import Pki
from core.console import cli_console
from core.logs import configure_service_logging
from core.settings import get_settings

app = typer.Typer(
    help="The MQTT broker. Every client logs in with its fieldline certificate (CN = client "
    "id) and may touch only the topics the ACL matrix of docs/design.md gives its role. `run` "
    "serves the embedded broker (durable, mutual TLS); `mosquitto-config` renders the same "
    "policy for "
    "Mosquitto, the production broker.",
    no_args_is_help=True,
)
console = cli_console()


@app.command()
def run(
    bind: str | None = typer.Option(
        None, "--bind", help="Listen address (default: broker.bind, 127.0.0.1)."
    ),
    port: int | None = typer.Option(
        None, "--port", min=0, max=65535, help="TLS port (default: broker.port, 8883)."
    ),
    metrics_port: int | None = typer.Option(
        None,
        "--metrics-port",
        min=0,
        max=65535,
        help="Prometheus /metrics port, 0 for none (default: broker.metrics_port, 9883).",
    ),
) -> None:
    """Serve the embedded broker with mutual TLS until SIGTERM or Ctrl-C.

    The CA, the server certificate (`broker.server_cert`, default `broker`) and the CRL come
    from FIELDLINE_HOME/pki. A rewritten CRL is picked up without a restart
    (`broker.crl_refresh_s`): revoked clients are disconnected and refused from then on.
    """
    settings = get_settings()
    configure_service_logging(settings)
    overrides = {
        key: value
        for key, value in (("bind", bind), ("port", port), ("metrics_port", metrics_port))
        if value is not None
    }
    b = settings.broker.model_copy(update=overrides)
    options = options_from_settings(settings.model_copy(update={"broker": b}))
    asyncio.run(serve(BrokerService(options, b.metrics_port, b.metrics_bind)))


@app.command("mosquitto-config")
def mosquitto_config(
    out: Path = typer.Option(..., "--out", help="Directory for mosquitto.conf, the ACL, certs/."),
    bind: str = typer.Option("0.0.0.0", "--bind", help="Listen address."),  # noqa: S104
    port: int = typer.Option(8883, "--port", min=1, max=65535, help="TLS port."),
    server_cert: str = typer.Option(
        "broker", "--server-cert", help="Name of the `fieldline certs server` bundle."
    ),
    persistence_dir: Path | None = typer.Option(
        None,
        "--persistence-dir",
        help="Keep sessions and queued messages across restarts in this directory.",
    ),
    autosave_interval: int | None = typer.Option(
        None,
        "--autosave-interval",
        min=1,
        help="With --persistence-dir: seconds between Mosquitto's saves (changes, with "
        "--autosave-on-changes). It saves only then and at shutdown: a kill -9 loses what it "
        "acknowledged since the last save. Default: broker.mosquitto_autosave_interval (1).",
    ),
    autosave_on_changes: bool | None = typer.Option(
        None,
        "--autosave-on-changes/--autosave-on-time",
        help="Count --autosave-interval in changes (a message queued for a session, a PUBACK "
        "from one) instead of seconds. Messages sent straight to a connected session are not "
        "counted, and every save rewrites the whole queue. Default: "
        "broker.mosquitto_autosave_on_changes (off: seconds).",
    ),
    run_as: str | None = typer.Option(
        None,
        "--run-as",
        help="Account mosquitto runs as (Debian: mosquitto); the files are given to it.",
    ),
    max_inflight: int = typer.Option(
        DEFAULT_MAX_INFLIGHT,
        "--max-inflight",
        min=1,
        help="Unacknowledged QoS 1/2 messages per MQTT 3.1.1 client (MQTT 5 clients set their own "
        "with Receive Maximum).",
    ),
    outage: str | None = typer.Option(
        None,
        "--outage",
        help="Longest ingest outage the worker's queue must hold (90s, 30m, 1h, 2d); sizes "
        "--max-queued and --max-queued-bytes. Default: broker.mosquitto_outage_s (1 h).",
    ),
    rate: float | None = typer.Option(
        None,
        "--rate",
        help="Messages/s the fleet publishes to the worker (`fieldline capacity` prints it as "
        "messages/s). Default: broker.mosquitto_queue_rate (200: a small plant).",
    ),
    message_bytes: int | None = typer.Option(
        None,
        "--message-bytes",
        help="Average payload bytes of those messages. Default: "
        "broker.mosquitto_message_bytes (256).",
    ),
    max_queued: int | None = typer.Option(
        None,
        "--max-queued",
        min=0,
        help="Messages queued per session beyond those in flight; more are dropped (already "
        "PUBACKed to their publishers). Default: --outage x --rate.",
    ),
    max_queued_bytes: int | None = typer.Option(
        None,
        "--max-queued-bytes",
        min=0,
        help="Payload bytes queued per session beyond those in flight; more are dropped. "
        "Default: --outage x --rate x --message-bytes. 0: no byte limit.",
    ),
    max_inflight_bytes: int = typer.Option(
        DEFAULT_MAX_INFLIGHT_BYTES,
        "--max-inflight-bytes",
        min=0,
        help="Unacknowledged QoS 1/2 bytes per client (one message always fits). 0: no limit.",
    ),
    memory_limit: int = typer.Option(
        DEFAULT_MEMORY_LIMIT,
        "--memory-limit",
        min=0,
        help="Bytes of heap Mosquitto may allocate (not OpenSSL's); a client whose message does "
        "not fit is disconnected. Off by default: in 2.0.11 any certificate holder can reserve "
        "it with unfinished CONNECTs (docs/operations.md). 0: no limit.",
    ),
    max_connections: int = typer.Option(
        DEFAULT_MAX_CONNECTIONS,
        "--max-connections",
        min=-1,
        help="TCP connections on the listener, including ones still in TLS or before CONNECT; "
        "more are closed at once. -1: no limit (then LimitNOFILE is the limit).",
    ),
    max_keepalive: int = typer.Option(
        DEFAULT_MAX_KEEPALIVE,
        "--max-keepalive",
        min=10,
        max=65535,
        help="MQTT 5 clients asking for a longer keepalive, or none, are given this one "
        "(Mosquitto 2.0 leaves MQTT 3.1.1 clients' keepalive alone).",
    ),
) -> None:
    """Render mosquitto.conf and an ACL file from the certificate registry and the policy.

    The ACL has one explicit block per issued principal, from the same policy object the
    embedded broker enforces. Re-run after `fieldline certs issue` or `revoke`, then
    `kill -HUP $(pidof mosquitto)`: Mosquitto re-reads the ACL file and the CRL.
    """
    if max_connections == 0:
        raise typer.BadParameter(
            "0 would mean no limit; use -1 for that", param_hint="--max-connections"
        )
    settings = get_settings()
    pki = Pki(settings.pki_dir)
    if autosave_interval is None:
        autosave_interval = settings.broker.mosquitto_autosave_interval
    if autosave_on_changes is None:
        autosave_on_changes = settings.broker.mosquitto_autosave_on_changes
    b = settings.broker
    try:
        queue = QueueSizing(
            parse_duration(outage) if outage is not None else b.mosquitto_outage_s,
            rate if rate is not None else b.mosquitto_queue_rate,
            message_bytes if message_bytes is not None else b.mosquitto_message_bytes,
        )
    except BrokerError as exc:
        raise typer.BadParameter(str(exc)) from None
    if max_queued is None:
        max_queued = queue.messages
    if max_queued_bytes is None:
        max_queued_bytes = queue.bytes
    options = MosquittoOptions(
        bind=bind,
        port=port,
        persistence_dir=persistence_dir.absolute() if persistence_dir else None,
        autosave_interval=autosave_interval,
        autosave_on_changes=autosave_on_changes,
        max_inflight_messages=max_inflight,
        max_queued_messages=max_queued,
        max_queued_bytes=max_queued_bytes,
        max_inflight_bytes=max_inflight_bytes,
        memory_limit=memory_limit,
        max_connections=max_connections,
        max_keepalive=max_keepalive,
        run_as=run_as,
    )
    files = write_mosquitto_files(pki, out, server_bundle_name=server_cert, options=options)
    count = len(principals_from_registry(pki))
    console.print(f"wrote {files.config}", highlight=False, soft_wrap=True)
    console.print(f"wrote {files.acl} ({count} principals)", highlight=False, soft_wrap=True)
    console.print(
        f"wrote {files.ca.parent}/ (CA, server certificate and key, CRL)",
        highlight=False,
        soft_wrap=True,
    )
    if (max_queued, max_queued_bytes) == (queue.messages, queue.bytes):
        console.print(queue.describe(), highlight=False, soft_wrap=True)
    else:
        console.print(
            f"worker queue: {max_queued:,} messages / {max_queued_bytes:,} bytes as given "
            f"(--outage/--rate would give {queue.messages:,} / {queue.bytes:,})",
            highlight=False,
            soft_wrap=True,
        )
    console.print(
        f"alert when the worker is {queue.outage_s / 2:g} s behind (half the queue): "
        "deploy/prometheus/alerts.yml, FieldlineIngestBrokerQueueHalfFull",
        highlight=False,
        soft_wrap=True,
    )
    console.print(f"run: mosquitto -c {files.config}", highlight=False, soft_wrap=True)


@app.command("nats-config")
def nats_config(
    out: Path = typer.Option(..., "--out", help="Directory for node-K.conf, certs/, node-K/."),
    nodes: int | None = typer.Option(
        None, "--nodes", min=1, max=32, help="nats-server nodes (default: nats.nodes, 3)."
    ),
    host: str | None = typer.Option(
        None,
        "--host",
        help="Listen address of every node, or one per node separated by commas (default: "
        "nats.host, 127.0.0.1). Routes dial these addresses.",
    ),
    mqtt_port: int | None = typer.Option(
        None,
        "--mqtt-port",
        min=1,
        max=65535,
        help="Node 1's MQTT port; node K listens on it + K - 1 (default: nats.mqtt_port, 8883).",
    ),
    client_port: int | None = typer.Option(
        None,
        "--client-port",
        min=1,
        max=65535,
        help="Node 1's NATS port for services such as the ingest worker, + K - 1 per node "
        "(default: nats.client_port, 4222).",
    ),
    cluster_port: int | None = typer.Option(
        None,
        "--cluster-port",
        min=1,
        max=65535,
        help="Node 1's route port, + K - 1 per node (default: nats.cluster_port, 6222).",
    ),
    monitor_port: int = typer.Option(
        0, "--monitor-port", min=0, max=65535, help="Node 1's HTTP /varz /jsz port; 0: none."
    ),
    server_cert: str = typer.Option(
        "broker", "--server-cert", help="Name of the `fieldline certs server` bundle."
    ),
    pki_dir: Path | None = typer.Option(
        None, "--pki", help="The PKI directory (default: FIELDLINE_HOME/pki)."
    ),
) -> None:
    """Render a NATS JetStream cluster (MQTT + JetStream) from the registry and the policy.

    Every node: an MQTT listener and a NATS listener with mutual TLS on the fieldline CA; each
    certificate logs in as the user named by its subject (verify_and_map) with its role's
    topics as subjects; revoked identities have no user. Re-run after `fieldline certs issue`
    or `revoke`, then `nats-server --signal reload=<pid>` on every node. The FIELDLINE
    stream (fl.>) is created by `fieldline up --broker nats` and by the ingest worker.
    """
    settings = get_settings()
    n = settings.nats
    pki = Pki(pki_dir or settings.pki_dir)
    if not pki.ca_cert_path.is_file():
        raise BrokerError(f"no CA in {pki.root}: run `fieldline certs init-ca` (or give --pki)")
    hosts = tuple(h.strip() for h in (host or n.host).split(",") if h.strip())
    options = NatsOptions(
        nodes=nodes or n.nodes,
        hosts=hosts or (n.host,),
        mqtt_port=mqtt_port or n.mqtt_port,
        client_port=client_port or n.client_port,
        cluster_port=cluster_port or n.cluster_port,
        monitor_port=monitor_port,
        server_bundle_name=server_cert,
    )
    files = write_nats_files(pki, out, options)
    count = len(principals_from_registry(pki))
    for k, config in enumerate(files.configs, start=1):
        console.print(
            f"wrote {config} (MQTT {options.host(k)}:{options.port(options.mqtt_port, k)}, "
            f"NATS {options.port(options.client_port, k)}, "
            f"routes {options.port(options.cluster_port, k)})",
            highlight=False,
            soft_wrap=True,
        )
    console.print(f"{count} users, stream replicas {options.replicas}", highlight=False)
    console.print(
        f"run: nats-server -c {files.configs[0]}  (one per node; nats-server "
        f"{'.'.join(map(str, MIN_SERVER_VERSION[:2]))} or later)",
        highlight=False,
        soft_wrap=True,
    )
