"""The telemetry dashboard's SQL, run as Grafana would run it, against a real TimescaleDB.

There is no Grafana here, so the test does Grafana's part: it interpolates the template
variables and the `$__timeFilter`/`$__interval_ms` macros the way Grafana's PostgreSQL data
source documents them, then runs every variable query and panel query as the tenant's
read-only role, the role the dashboard's data source is meant to log in as.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from ingest_worker.migrate import add_tenant, quote_ident, reader_role, tenant_schema

pytestmark = pytest.mark.integration

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "telemetry.json"
START = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
SAMPLES = 3600  # one hour of a 1 Hz metric
INTERVAL_MS = 60_000  # the interval Grafana would pick for a 1 h range at ~60 points


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def _interpolate(sql: str, values: dict[str, str], multi: set[str]) -> str:
    """Grafana's interpolation for SQL data sources: a multi-value variable is quoted and
    comma-joined, a single value goes in raw; `${x:raw}` is always raw."""

    def value(name: str) -> str:
        raw = values[name]
        return f"'{raw}'" if name in multi else raw

    sql = re.sub(r"\$\{(\w+):raw\}", lambda m: values[m.group(1)], sql)
    sql = sql.replace("$__interval_ms", str(INTERVAL_MS))
    frm = START.isoformat()
    to = (START + timedelta(seconds=SAMPLES)).isoformat()
    sql = re.sub(r"\$__timeFilter\(([\w.]+)\)", rf"\1 BETWEEN '{frm}' AND '{to}'", sql)
    sql = sql.replace("$__timeFrom()", f"'{frm}'").replace("$__timeTo()", f"'{to}'")
    sql = re.sub(r"\$\{(\w+)\}", lambda m: value(m.group(1)), sql)
    sql = re.sub(r"\$(\w+)", lambda m: value(m.group(1)), sql)
    assert "$" not in sql, sql
    return sql


async def _seed(conn: asyncpg.Connection, schema: str) -> None:
    await conn.execute(
        f"INSERT INTO {schema}.devices (id, status, last_seen, fw, boot) VALUES "  # noqa: S608
        "('press-1', 'online', $1, '1.4.0', 7), ('press-2', 'offline', $1, '1.3.9', 2)",
        START + timedelta(seconds=SAMPLES),
    )
    await conn.execute(
        f"INSERT INTO {schema}.metrics (device_id, name, unit, kind) VALUES "  # noqa: S608
        "('press-1', 'temp', 'degC', 'numeric'), ('press-1', 'pressure', 'bar', 'numeric'), "
        "('press-1', 'mode', NULL, 'text'), ('press-2', 'temp', 'degC', 'numeric')"
    )
    ids = dict(
        await conn.fetch(
            f"SELECT name, id FROM {schema}.metrics WHERE device_id = 'press-1'"  # noqa: S608
        )
    )
    rows = [
        (START + timedelta(seconds=i), metric_id, 20 + (i % 97) * 0.25 + metric_id)
        for i in range(SAMPLES)
        for metric_id in (ids["temp"], ids["pressure"])
    ]
    await conn.copy_records_to_table(
        "numeric_values", schema_name=schema.strip('"'), records=rows,
        columns=["time", "metric_id", "value"],
    )  # fmt: skip
    await conn.execute(
        f"INSERT INTO {schema}.events (time, device_id, kind, severity, body) VALUES "  # noqa: S608
        "($1, 'press-1', 'overheat', 'warning', '{\"message\": \"hot\"}')",
        START + timedelta(minutes=5),
    )
    await conn.execute(
        f"INSERT INTO {schema}.commands (id, device_id, name, issued_at, status) VALUES "  # noqa: S608
        "(gen_random_uuid(), 'press-1', 'reset', $1, 'ok')",
        START + timedelta(minutes=6),
    )


async def test_every_dashboard_query_runs_as_the_tenant_reader_and_charts_the_database(
    timescale_dsn: str,
) -> None:
    dashboard = _dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == "grafana-postgresql-datasource"
    multi = {name for name, v in variables.items() if v.get("multi")}
    conn = await asyncpg.connect(timescale_dsn)
    try:
        await add_tenant(conn, "acme")
        await add_tenant(conn, "other")  # the reader of acme must not see it
        schema = quote_ident(tenant_schema("acme"))
        await _seed(conn, schema)
        await conn.execute(f"SET ROLE {quote_ident(reader_role('acme'))}")

        # the variables, in order, each chosen from what its query offers
        values: dict[str, str] = {}
        offered: dict[str, list[str]] = {}
        for name in ("schema", "device", "metric"):
            rows = await conn.fetch(_interpolate(variables[name]["query"], values, multi))
            offered[name] = [r[0] for r in rows]
            values[name] = offered[name][0]
        assert offered["schema"] == [tenant_schema("acme")]  # never the other tenant
        assert offered["device"] == ["press-1", "press-2"]
        assert offered["metric"] == ["pressure", "temp"]  # numeric only: not `mode`

        values["metric"] = "temp"
        results: dict[int, list[asyncpg.Record]] = {}
        for panel in dashboard["panels"]:
            if panel["type"] == "row":
                continue
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            for target in panel["targets"]:
                results[panel["id"]] = await conn.fetch(
                    _interpolate(target["rawSql"], values, multi)
                )
        await conn.execute("RESET ROLE")

        # the chart: one point per minute, each the SQL aggregate of that minute's samples
        chart = results[2]
        expected = await conn.fetch(
            f"SELECT time_bucket('1 minute', v.time) AS t, avg(v.value), min(v.value), "  # noqa: S608
            f"max(v.value) FROM {schema}.numeric_values v JOIN {schema}.metrics m "
            "ON m.id = v.metric_id WHERE m.device_id = 'press-1' AND m.name = 'temp' "
            "GROUP BY 1 ORDER BY 1"
        )
        assert len(chart) == 60
        assert [tuple(r) for r in chart] == [tuple(r) for r in expected]
    finally:
        await conn.close()

    latest = {r["metric"]: r["value"] for r in results[3]}
    assert set(latest) == {"pressure", "temp"}
    assert [r["kind"] for r in results[4]] == ["overheat"]
    assert [(r["name"], r["status"]) for r in results[5]] == [("reset", "ok")]
    assert [(r["device"], r["status"]) for r in results[7]] == [
        ("press-1", "online"),
        ("press-2", "offline"),
    ]
    assert tuple(results[8][0]) == (1, 2)
