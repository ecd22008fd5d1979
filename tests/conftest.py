"""Shared fixtures: each starts a real server on a free loopback port and always stops it."""

from tests.fixtures.amqtt import plain_amqtt
from tests.fixtures.brokers import broker, broker_factory
from tests.fixtures.mosquitto import mosquitto, mosquitto_factory
from tests.fixtures.nats import nats_cluster, nats_cluster_factory
from tests.fixtures.pki import test_pki
from tests.fixtures.postgres import pg_dsn, pg_server, timescale_dsn

__all__ = [
    "broker",
    "broker_factory",
    "mosquitto",
    "mosquitto_factory",
    "nats_cluster",
    "nats_cluster_factory",
    "pg_dsn",
    "pg_server",
    "plain_amqtt",
    "test_pki",
    "timescale_dsn",
]
