"""The one settings model: environment (prefix FIELDLINE_, nested with __) over fieldline.toml."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from core.errors import SettingsError
from schemas.topics import validate_id

CONFIG_ENV = "FIELDLINE_CONFIG"
DEFAULT_CONFIG_FILE = "fieldline.toml"


class _Section(BaseModel):
    # a misspelt key must be an error, not silently ignored
    model_config = ConfigDict(extra="forbid")


class BrokerSettings(_Section):
    """Where clients find the broker, and how the embedded one listens (always mutual TLS)."""

    host: str = Field(default="127.0.0.1", description="the name clients connect to")
    port: int = Field(default=8883, ge=0, le=65535, description="0 picks a free port")
    keepalive_s: int = Field(default=30, ge=5, le=3600, description="clients' MQTT keepalive")
    bind: str = Field(default="127.0.0.1", description="the embedded broker's listen address")
    server_cert: str = Field(default="broker", description="name of the `certs server` bundle")
    max_connections: int = Field(default=20_000, ge=1)
    max_subscriptions: int = Field(
        default=100, ge=1, description="filters one client may hold; more get SUBACK 0x80"
    )
    connect_timeout_s: float = Field(default=10.0, gt=0, description="TLS handshake + CONNECT")
    max_pending_handshakes: int = Field(
        default=2000,
        ge=1,
        description="TLS handshakes in progress at once; beyond it a new socket is closed "
        "before any TLS work (each pending one holds up to ~47 KiB for connect_timeout_s)",
    )
    max_packet_bytes: int = Field(default=2 * 1024 * 1024, ge=1024)
    max_inflight: int = Field(default=100, ge=1, le=65535, description="per client, QoS 1/2")
    max_queued: int = Field(default=10_000, ge=0, description="per session, beyond in flight")
    service_max_inflight: int = Field(
        default=10_000, ge=1, le=65535, description="for `service` clients (ingest workers)"
    )
    service_max_queued: int = Field(
        default=200_000, ge=0, description="for `service` sessions: what a stopped worker misses"
    )
    max_inflight_bytes: int = Field(
        default=4 * 1024 * 1024, ge=1024, description="per client: bytes of QoS 1/2 unacknowledged"
    )
    max_queued_bytes: int = Field(
        default=16 * 1024 * 1024,
        ge=1024,
        description="per session, beyond in flight; a connected client past it is cut off",
    )
    service_max_inflight_bytes: int = Field(
        default=64 * 1024 * 1024, ge=1024, description="the same for `service` clients"
    )
    service_max_queued_bytes: int = Field(
        default=256 * 1024 * 1024, ge=1024, description="the same for `service` sessions"
    )
    memory_budget_bytes: int = Field(
        default=1024 * 1024 * 1024,
        ge=64 * 1024,
        description="messages held for all sessions together; publishers wait beyond it",
    )
    session_expiry_s: int = Field(
        default=7 * 24 * 3600,
        ge=0,
        description="an offline persistent session and its queue are deleted after it; 0: never",
    )
    durable: bool = Field(
        default=True,
        description="keep persistent sessions, their queued QoS 1/2 messages and retained "
        "messages in a store (SQLite) so a crash or kill -9 loses nothing acknowledged",
    )
    store_path: Path | None = Field(
        default=None, description="the durable store; default FIELDLINE_HOME/broker/store.sqlite3"
    )
    store_sync: Literal["normal", "full"] = Field(
        default="normal",
        description="normal: a commit survives the broker process dying; full: also a power "
        "cut (an fsync per commit group)",
    )
    crl_refresh_s: float = Field(default=5.0, gt=0, description="how often the CRL is re-read")
    metrics_port: int = Field(default=9883, ge=0, le=65535, description="0 turns it off")
    metrics_bind: str = "127.0.0.1"
    # Mosquitto (`mosquitto-config`): how often it saves its persistence file. It only saves
    # periodically, so a kill -9 loses what it acknowledged since the last save; every 1 s
    # (a save comes 1-2 s after the last) costs no measurable throughput, even with 200,000
    # messages queued (benchmarks/mosquitto_durability.py; docs/operations.md, Mosquitto in
    # production).
    mosquitto_outage_s: float = Field(
        default=3600.0,
        gt=0,
        description="ingest outage the rendered Mosquitto queues for the worker "
        "(`mosquitto-config --outage`); beyond it messages are dropped, already PUBACKed",
    )
    mosquitto_queue_rate: float = Field(
        default=200.0,
        gt=0,
        description="messages/s the fleet sends the worker, for sizing that queue "
        "(`--rate`; `fieldline capacity` prints it): a small plant, 200 devices at 1 msg/s",
    )
    mosquitto_message_bytes: int = Field(
        default=256,
        ge=1,
        description="average payload bytes of those messages (`--message-bytes`)",
    )
    mosquitto_autosave_interval: int = Field(
        default=1,
        ge=1,
        description="seconds between Mosquitto's saves (changes with "
        "mosquitto_autosave_on_changes); a kill -9 loses what it acknowledged since the last",
    )
    mosquitto_autosave_on_changes: bool = Field(
        default=False,
        description="count changes (a message queued for a session, a PUBACK from one) instead "
        "of seconds; messages sent straight to a connected session are not counted, and each "
        "save rewrites the whole queue",
    )


class IngestSettings(_Section):
    """The ingest worker: who it is on the broker, how it batches, when it gives up waiting."""

    identity: str = Field(default="ingest-1", description="its `service` certificate's id")
    source: Literal["mqtt", "nats"] = Field(
        default="mqtt",
        description="mqtt: subscribe to the broker; nats: pull from a stream of the NATS "
        "JetStream cluster, ingest.nats_stream (docs/ingest.md, Consuming from NATS JetStream)",
    )
    nats_urls: list[str] = Field(
        default_factory=list,
        description="the NATS cluster's client URLs (tls://host:port), tried in turn at "
        "connect and on reconnect; empty: every node of the `nats` section's cluster",
    )
    nats_consumer: str = Field(
        default="ingest",
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="the durable pull consumer on ingest.nats_stream that all workers share "
        "(created or updated by `fieldline ingest nats-ensure` and by each worker at start)",
    )
    nats_stream: Literal["$MQTT_msgs", "FIELDLINE"] = Field(
        default="$MQTT_msgs",
        description="$MQTT_msgs: nats-server's own store of QoS 1 MQTT publishes, written "
        "before the device's PUBACK (nothing PUBACKed is lost); FIELDLINE: the `fl.>` stream, "
        "which NATS-native publishers can use but which the PUBACK does not wait for",
    )
    nats_max_ack_pending: int = Field(
        default=10_000,
        ge=1,
        description="messages delivered to the workers and not yet acknowledged, for the "
        "consumer as a whole; JetStream delivers no more until some are acknowledged",
    )
    nats_ack_wait_s: float = Field(
        default=30.0,
        gt=0,
        description="a message delivered and not acknowledged within it is delivered again "
        "(to any worker); longer than a commit under load",
    )
    nats_fetch_batch: int = Field(
        default=500, ge=1, le=10_000, description="messages asked for in one pull request"
    )
    nats_fetch_max_bytes: int = Field(
        default=32 * 1024 * 1024,
        ge=64 * 1024,
        description="bytes one pull may bring at most, counting each message at the server's "
        "max_payload (nats-py's fetch has no byte bound): a pull asks for at most this / "
        "max_payload messages (16 at 2 MiB), never fewer than 1",
    )
    client: Literal["lean", "paho"] = Field(default="lean", description="MQTT receive path")
    protocol: Literal["auto", "5", "3.1.1"] = Field(
        default="auto", description="auto: MQTT 5, or 3.1.1 where the broker refuses 5"
    )
    share_group: str | None = Field(
        default=None, description="subscribe as $share/<group>/... so workers split the load"
    )
    receive_maximum: int = Field(
        default=10000, ge=1, le=65535, description="unacknowledged messages at once; <= broker's"
    )
    session_expiry_s: int = Field(default=7 * 24 * 3600, ge=0)
    batch_max_rows: int = Field(default=20_000, ge=1)
    batch_max_wait_ms: float = Field(
        default=5.0, gt=0, description="a free writer waits this long for a batch to fill"
    )
    writers: int = Field(default=2, ge=1, le=16, description="database connections writing")
    queue_max: int = Field(default=20000, ge=10, description="received, not yet acknowledged")
    queue_max_rows: int = Field(
        default=200_000, ge=100, description="the rows those messages carry, at most"
    )
    queue_max_bytes: int = Field(
        default=64 * 1024 * 1024, ge=64 * 1024, description="their payload bytes, at most"
    )
    transient_tries: int = Field(
        default=3,
        ge=1,
        description="tries of a batch failing transiently (deadlock, timeout) before it is "
        "split to isolate the message at fault (a dead letter, db_rejected)",
    )
    statement_timeout_s: float = Field(
        default=15.0, ge=0, description="longest a write statement may run (0: no limit)"
    )
    offline_after_s: float = Field(default=20.0, gt=0, description="silence that means offline")
    max_future_skew_s: float = Field(
        default=300.0, ge=0, description="timestamps further ahead of receipt are refused"
    )
    max_payload_bytes: int = Field(
        default=256 * 1024, ge=1024, description="larger payloads are dead letters (too_large)"
    )
    max_samples: int = Field(
        default=1000, ge=1, description="samples in one backlog message (too_many_samples)"
    )
    max_metrics_per_message: int = Field(
        default=256, ge=1, description="metrics in one sample (too_many_metrics)"
    )
    max_backfill_s: float = Field(
        default=7 * 24 * 3600.0,
        gt=0,
        description="samples older than this (or the tenant's retention) are refused (too_old)",
    )
    max_metrics_per_device: int = Field(
        default=1000, ge=1, description="metric names one device may have (metric_limit)"
    )
    new_metrics_per_minute: int = Field(
        default=1000, ge=1, description="metric names a device may create a minute (metric_rate)"
    )
    dead_letter_payload_bytes: int = Field(
        default=4096, ge=0, description="payload prefix a dead letter keeps (+ size and sha256)"
    )
    dead_letters_per_device_per_minute: int = Field(
        default=60, ge=1, description="dead letters stored per device; the rest only counted"
    )
    seq_reorder_window_s: float = Field(
        default=60.0,
        ge=0,
        description="a hole in a device's committed `seq` counts as loss once this old "
        "(another writer or worker may still be committing it); 0: at once",
    )
    seq_reorder_span: int = Field(
        default=65_536,
        ge=1,
        le=1_048_576,
        description="seq numbers a device's row tracks beyond its contiguous mark (bits: "
        "8 KiB at the default, only while a hole is open); holes further back count at once",
    )
    retention_every_s: float = Field(default=3600.0, gt=0)
    metrics_port: int = Field(default=9884, ge=0, le=65535, description="0 turns it off")
    metrics_bind: str = "127.0.0.1"


class CertsSettings(_Section):
    """The PKI's revocation list: how long each CRL is current, and who renews it."""

    crl_validity_days: float = Field(
        default=30.0,
        gt=0,
        le=3650,
        description="how long a written CRL is current (its nextUpdate); past it both brokers "
        "refuse every client. Renewed when a third remains",
    )
    crl_auto_renew: bool = Field(
        default=True,
        description="the embedded broker and `fieldline up` renew the CRL themselves when the "
        "CA key is on their machine and not encrypted",
    )
    crl_renew_check_s: float = Field(
        default=300.0, gt=0, description="how often they check whether renewal is due"
    )


class EdgeSettings(_Section):
    """What one device on an edge agent's LAN listener may send (edge_agent/languard.py)."""

    lan_readings_per_s: float = Field(
        default=50.0,
        gt=0,
        description="telemetry samples per second one LAN device may send (bursts of "
        "lan_burst_s); beyond it its messages are acknowledged and dropped, counted and told",
    )
    lan_bytes_per_s: float = Field(
        default=64 * 1024,
        gt=0,
        description="telemetry payload bytes per second one LAN device may send (bursts of "
        "lan_burst_s); beyond it its messages are acknowledged and dropped, counted and told",
    )
    lan_burst_s: float = Field(
        default=10.0, gt=0, description="seconds of the two rates above a device may send at once"
    )
    lan_metrics_per_device: int = Field(
        default=100,
        ge=1,
        description="metric names one LAN device may introduce; a new name beyond it is dropped "
        "(the agent is one device upstream: ingest.max_metrics_per_device counts them all)",
    )
    lan_metrics_per_listener: int = Field(
        default=500,
        ge=1,
        description="metric names all devices of one listener may introduce together",
    )


class CommandSettings(_Section):
    """How devices of the simulator and the edge agent refuse replayed or stale commands."""

    recent_ids: int = Field(
        default=256, ge=1, description="command ids a device remembers; a repeat is rejected"
    )
    default_ttl_s: int = Field(
        default=60, ge=1, le=7 * 24 * 3600, description="ttl of a command without ttl_s"
    )
    max_clock_skew_s: float = Field(
        default=60.0, ge=0, description="how far a command's ts may be ahead of the device clock"
    )


class NatsSettings(_Section):
    """The NATS JetStream cluster of `fieldline broker nats-config` and `fieldline up --broker
    nats`: node K listens on each port + K - 1; one stream, FIELDLINE, holds `fl.>`."""

    nodes: int = Field(default=3, ge=1, le=32, description="nats-server processes in the cluster")
    host: str = Field(
        default="127.0.0.1",
        description="listen address of every node, or one per node separated by commas",
    )
    mqtt_port: int = Field(
        default=8883, ge=1, le=65535, description="node 1's MQTT (mutual TLS) port"
    )
    client_port: int = Field(
        default=4222, ge=1, le=65535, description="node 1's NATS (mutual TLS) port for services"
    )
    cluster_port: int = Field(
        default=6222, ge=1, le=65535, description="node 1's route port (TLS, cluster CA)"
    )
    stream_max_bytes: int = Field(
        default=1024**3,
        ge=1024 * 1024,
        description="bytes the FIELDLINE stream keeps per replica; past it the oldest "
        "messages go, consumed or not",
    )
    stream_max_age_s: float = Field(
        default=7 * 24 * 3600.0,
        gt=0,
        description="how long the FIELDLINE stream keeps a message, consumed or not",
    )
    duplicate_window_s: float = Field(
        default=120.0,
        gt=0,
        description="the stream drops a repeated Nats-Msg-Id within this window (NATS "
        "publishers only: MQTT publishes carry none)",
    )
    max_store_bytes: int = Field(
        default=2 * 1024**3,
        ge=2 * 1024 * 1024,
        description="JetStream file store of each node (max_file_store): FIELDLINE's "
        "stream_max_bytes plus $MQTT_msgs, which keeps every QoS 1 message until the worker "
        "acks it; 2 GiB = 1 GiB for FIELDLINE + 1 GiB, ~4x a 1 h worker outage at 200 "
        "msg/s of 256 B (~350 B stored each); past it devices get no PUBACK and nats-server "
        "refuses MQTT until raised and restarted (docs/broker.md)",
    )
    max_memory_store_bytes: int = Field(
        default=256 * 1024 * 1024,
        ge=1024 * 1024,
        description="JetStream memory store of each node (max_memory_store; nats-server's "
        "default is 75% of RAM): fieldline keeps nothing there, an admin-made memory "
        "stream is refused past it",
    )


class WebSettings(_Section):
    """`fieldline web run`: the HTTP API and console (docs/web.md), and its bounds."""

    host: str = Field(
        default="127.0.0.1",
        description="listen address; anything but loopback requires HTTPS (web.server_cert)",
    )
    port: int = Field(default=8080, ge=0, le=65535, description="0 picks a free port")
    https: Literal["auto", "always"] = Field(
        default="auto",
        description="auto: HTTPS beyond loopback (required), plain HTTP on loopback; "
        "always: HTTPS on loopback too",
    )
    server_cert: str = Field(
        default="web", description="name of the `fieldline certs server` bundle it serves"
    )
    operator_identity: str = Field(
        default="web-{tenant}",
        description="the operator certificate commands are published as, per tenant "
        "({tenant} is replaced); issue it with `fieldline certs issue web-T --tenant T "
        "--role operator`",
    )
    max_body_bytes: int = Field(
        default=64 * 1024, ge=1024, description="larger request bodies are refused (413)"
    )
    rate_per_s: float = Field(
        default=20.0, gt=0, description="requests a token may make per second, sustained (429)"
    )
    rate_burst: int = Field(
        default=100, ge=1, description="requests a token may make at once before rate_per_s"
    )
    auth_failures_per_min: int = Field(
        default=30,
        ge=1,
        description="failed token checks one client address may make per minute (as a burst, "
        "then refilled); beyond it every request from that address is a 429 until the bucket "
        "refills, valid tokens included, and no token is looked up",
    )
    max_points: int = Field(
        default=5000, ge=2, description="largest `points` of a metric series (400 beyond)"
    )
    max_limit: int = Field(
        default=1000, ge=1, description="largest `limit` of events, alerts, commands (400)"
    )
    max_streams_per_token: int = Field(
        default=4, ge=1, description="live streams (server-sent events) one token may hold (429)"
    )
    stream_poll_s: float = Field(
        default=1.0, gt=0, description="how often a live stream looks for changes"
    )
    stream_ping_s: float = Field(
        default=15.0, gt=0, description="a ping event keeps idle streams (and proxies) open"
    )
    db_pool_size: int = Field(
        default=10, ge=1, le=100, description="database connections per database it reads"
    )
    publish_timeout_s: float = Field(
        default=10.0, gt=0, description="how long a command waits for the broker's PUBACK"
    )
    statement_timeout_s: float = Field(
        default=15.0, gt=0, description="longest a query of the API may run (then 503)"
    )
    read_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="time a client has to send a request's headers (from connecting, or after "
        "the previous answer: then the connection is closed) and, after them, its whole body "
        "(then 408); slow clients cannot hold connections open",
    )
    max_event_body_bytes: int = Field(
        default=8 * 1024,
        ge=256,
        description="an event body larger than this (as JSON text) is shown as "
        '{"truncated": true, "bytes", "message"}, so a page of events stays small',
    )


class StorageSettings(_Section):
    """Compaction of numeric samples into packed rows (ingest_worker/compaction.py)."""

    compact_after_s: float = Field(
        default=86400.0,
        gt=0,
        description="hot rows of UTC days that ended this long ago are packed (1 day: the "
        "hot table holds today and yesterday)",
    )
    compact_every_s: float = Field(
        default=300.0, gt=0, description="how often the worker's maintenance loop compacts"
    )
    compact_budget_s: float = Field(
        default=20.0,
        gt=0,
        description="time one pass may take (then it stops and the next pass goes on), so "
        "compaction never holds the maintenance loop for long",
    )
    compact_batch_rows: int = Field(
        default=200_000,
        ge=1000,
        description="rows per compaction transaction, about (a day of a range of metrics); "
        "a writer redelivering into that range waits for it",
    )


class PostgresSettings(_Section):
    """The embedded PostgreSQL cluster under FIELDLINE_HOME/pg (unless database_url is set)."""

    port: int = Field(default=0, ge=0, le=65535, description="0 picks a free loopback port")
    bin_dir: Path | None = Field(default=None, description="PostgreSQL's bin directory")
    database: str = "fieldline"
    user: str = "fieldline"


class Settings(BaseSettings):
    """fieldline's configuration, validated once at start-up."""

    model_config = SettingsConfigDict(
        env_prefix="FIELDLINE_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    home: Path = Field(default=Path(".fieldline"), description="the data directory")
    database_url: str | None = Field(
        default=None, description="a PostgreSQL DSN; unset means the embedded cluster"
    )
    log_level: str = "INFO"
    log_burst: int = Field(
        default=100,
        ge=1,
        description="log lines of one kind (logger and message template) written at once "
        "before log_lines_per_s applies; what is held back is counted "
        "(fieldline_log_lines_suppressed_total) and told by the next line of that kind",
    )
    log_lines_per_s: float = Field(
        default=1.0, gt=0, description="log lines of one kind written per second past log_burst"
    )
    log_line_chars: int = Field(
        default=16384,
        ge=256,
        description="a log line (a traceback included) is cut past this many characters",
    )
    tenant_databases: dict[str, str] = Field(
        default_factory=dict,
        description="tenants routed to a PostgreSQL of their own: {tenant: URL}",
    )
    operator: str = Field(
        default="operator",
        description="the operator certificate `fieldline cmd send` and `tail` connect as",
    )
    broker: BrokerSettings = BrokerSettings()
    ingest: IngestSettings = IngestSettings()
    postgres: PostgresSettings = PostgresSettings()
    commands: CommandSettings = CommandSettings()
    edge: EdgeSettings = EdgeSettings()
    certs: CertsSettings = CertsSettings()
    nats: NatsSettings = NatsSettings()
    web: WebSettings = WebSettings()
    storage: StorageSettings = StorageSettings()

    @field_validator("database_url")
    @classmethod
    def _dsn_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError(
                "must start with postgresql:// (for example postgresql://user@host/db)"
            )
        return value

    @field_validator("tenant_databases")
    @classmethod
    def _tenant_dsns(cls, value: dict[str, str]) -> dict[str, str]:
        for tenant, dsn in value.items():
            validate_id(tenant, "tenant id")
            if not dsn.startswith(("postgresql://", "postgres://")):
                raise ValueError(f"{tenant}: must start with postgresql://")
        return value

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        upper = value.upper()
        if upper not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR")
        return upper

    @property
    def pki_dir(self) -> Path:
        """Where the CA, issued certificates and the registry live."""
        return self.home / "pki"

    @property
    def pg_dir(self) -> Path:
        """Where the embedded PostgreSQL cluster lives."""
        return self.home / "pg"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_file = config_file()
        if toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)


def config_file() -> Path | None:
    """The TOML file in force: $FIELDLINE_CONFIG (must exist) or ./fieldline.toml if present."""
    named = os.environ.get(CONFIG_ENV)
    if named:
        path = Path(named)
        if not path.is_file():
            raise SettingsError(
                f"{CONFIG_ENV}={named}: no such file; create it or unset the variable"
            )
        return path
    default = Path(DEFAULT_CONFIG_FILE)
    return default if default.is_file() else None


def _key_name(loc: tuple[int | str, ...]) -> str:
    dotted = ".".join(str(part) for part in loc)
    env = "FIELDLINE_" + "__".join(str(part).upper() for part in loc)
    return f"{dotted} ({env})"


def load_settings(**overrides: Any) -> Settings:
    """Build and validate the settings; a bad value raises SettingsError naming the key."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            if err["type"] == "extra_forbidden":
                problems.append(f"{_key_name(err['loc'])}: unknown setting; check its spelling")
            else:
                problems.append(f"{_key_name(err['loc'])}: {err['msg']} (got {err.get('input')!r})")
        raise SettingsError("invalid configuration:\n  " + "\n  ".join(problems)) from exc
    except (OSError, ValueError) as exc:  # a TOML file that does not parse
        raise SettingsError(f"cannot read the configuration file: {exc}") from exc


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, loaded on first use."""
    return load_settings()
