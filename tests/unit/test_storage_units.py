"""Pure parts of the storage layer: migration files, DSN masking, identifiers."""

from __future__ import annotations

import pytest

from ingest_worker.database import mask_dsn
from ingest_worker.errors import StorageError
from ingest_worker.migrate import (
    Capabilities,
    RetentionMode,
    Scope,
    _render,
    load_migrations,
    quote_ident,
    tenant_schema,
)


def test_migrations_are_numbered_and_paired() -> None:
    shared = load_migrations(Scope.SHARED)
    tenant = load_migrations(Scope.TENANT)
    assert [m.version for m in shared] == list(range(1, len(shared) + 1))
    assert [m.version for m in tenant] == list(range(1, len(tenant) + 1))
    assert tenant[0].timescale_sql  # the core tables become hypertables
    assert "{schema}.numeric_values" in tenant[0].sql
    # changing a file changes the checksum that schema_migrations records
    assert tenant[0].checksum != shared[0].checksum


def test_render_keeps_literal_braces() -> None:
    sql = "CREATE TABLE {schema}.t (meta jsonb DEFAULT '{}'::jsonb)"
    assert _render(sql, {"schema": '"tenant_a"'}) == (
        "CREATE TABLE \"tenant_a\".t (meta jsonb DEFAULT '{}'::jsonb)"
    )


@pytest.mark.parametrize(
    ("dsn", "masked"),
    [
        ("postgresql://fl:s3cr%40t@127.0.0.1:5432/db", "postgresql://fl:***@127.0.0.1:5432/db"),
        ("postgres://u:p@h/d", "postgres://u:***@h/d"),
        ("postgresql://u@h/d", "postgresql://u@h/d"),
    ],
)
def test_mask_dsn(dsn: str, masked: str) -> None:
    assert mask_dsn(dsn) == masked


def test_long_tenant_ids_get_distinct_schema_names_that_fit() -> None:
    a, b = "a" * 60 + "xxxx", "a" * 60 + "yyyy"
    names = {tenant_schema(a), tenant_schema(b)}
    assert len(names) == 2
    assert all(len(n) + len("_reader") <= 63 for n in names)
    assert tenant_schema("x" * 49) == "tenant_" + "x" * 49


def test_tenant_schema_and_quoting() -> None:
    assert tenant_schema("acme-eu") == "tenant_acme-eu"
    assert quote_ident('we"ird') == '"we""ird"'
    with pytest.raises(StorageError, match="tenant id"):
        tenant_schema("ACME")


@pytest.mark.parametrize(
    ("caps", "mode"),
    [
        (Capabilities(None, None), RetentionMode.DELETE),
        (Capabilities("2.19.3", "apache"), RetentionMode.DROP_CHUNKS),
        (Capabilities("2.19.3", "timescale"), RetentionMode.POLICY),
    ],
)
def test_retention_mode_follows_the_licence(caps: Capabilities, mode: RetentionMode) -> None:
    assert caps.retention is mode
    assert caps.hypertables is (caps.timescaledb is not None)
