"""Shared fixtures: each starts a real server on a free loopback port and always stops it."""

from tests.fixtures.postgres import pg_dsn, pg_server, timescale_dsn

__all__ = ["pg_dsn", "pg_server", "timescale_dsn"]
