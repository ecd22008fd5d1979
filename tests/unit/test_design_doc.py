"""docs/design.md against the code: the tables a reader trusts cannot silently drift.

Each test reads one table of the design contract and compares it with what the code defines
(topic kinds, the ACL policy, the migrations, dead-letter reasons, command refusals, defaults).
"""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

import ingest_worker.admission
import ingest_worker.decode
from broker.mosquitto import MosquittoFiles, MosquittoOptions, render_config
from broker.policy import Action, Policy, Principal, grants_for
from certs import Role
from core.settings import Settings
from device_runtime.intake import CommandIntake, Refusal
from schemas.limits import METRIC_NAME_PATTERN
from schemas.messages import MODELS, Reason
from schemas.topics import ID_PATTERN, Kind, parse

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "design.md"
MIGRATIONS = REPO / "ingest_worker" / "migrations"

Row = list[str]


def doc() -> str:
    return DOC.read_text(encoding="utf-8")


def section(title: str, text: str | None = None) -> str:
    """The body of the `## title` (or `### title`) heading, up to the next heading as high."""
    text = doc() if text is None else text
    match = re.search(rf"^(#+) {re.escape(title)}\s*$", text, re.MULTILINE)
    assert match is not None, f"docs/design.md has no heading {title!r}"
    level = len(match[1])
    rest = text[match.end() :]
    end = re.search(rf"^#{{1,{level}}} ", rest, re.MULTILINE)
    return rest if end is None else rest[: end.start()]


def table_after(text: str, marker: str = "") -> list[Row]:
    """The body rows (header and rule dropped) of the first Markdown table after `marker`."""
    start = text.index(marker) if marker else 0
    rows: list[Row] = []
    for line in text[start:].splitlines():
        if line.startswith("|"):
            # a `\|` inside a cell is a literal bar, not a column break
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            rows.append(cells)
        elif rows:
            break
    assert len(rows) > 2, f"no table after {marker!r}"
    return rows[2:]


def ticks(cell: str) -> list[str]:
    """The `code` spans of a cell."""
    return re.findall(r"`([^`]+)`", cell)


def by_key(rows: list[Row]) -> dict[str, Row]:
    """Rows keyed by the first code span of their first cell; a key twice is an error."""
    out: dict[str, Row] = {}
    for row in rows:
        key = ticks(row[0])[0]
        assert key not in out, f"{key!r} has two rows"
        out[key] = row
    return out


# -- topics --------------------------------------------------------------------------------


def test_the_topic_table_has_one_row_per_kind_with_its_model() -> None:
    rows = table_after(section("Topics"))
    seen: dict[Kind, Row] = {}
    for row in rows:
        # a valid topic once the placeholders are ids: parse() is the grammar's only judge
        template = ticks(row[0])[0]
        topic = parse(template.format(tenant="t", device="d", name="n"))
        assert topic.kind not in seen, f"{topic.kind} has two rows"
        seen[topic.kind] = row
        assert ticks(row[1]) == [topic.kind.value], row
        assert ticks(row[5]) == [MODELS[topic.kind].__name__], row
    assert set(seen) == set(Kind)
    assert "**yes**" in seen[Kind.STATUS][4]  # the only retained kind
    assert all("yes" not in r[4] for k, r in seen.items() if k is not Kind.STATUS)


def test_the_id_and_metric_name_patterns_are_quoted_verbatim() -> None:
    text = doc()
    assert f"`{ID_PATTERN}`" in text
    assert f"`{METRIC_NAME_PATTERN}`" in text


# -- identity and ACL --------------------------------------------------------------------


def test_the_acl_table_is_what_the_policy_grants_every_role() -> None:
    rows = by_key(table_after(section("ACL matrix")))
    assert set(rows) == {role.value for role in Role}
    policy = Policy()
    for role in Role:
        row = rows[role.value]
        principal = Principal("d", "t", role)
        grants = grants_for(principal)
        assert set(ticks(row[1])) == set(grants.publish), f"{role} publish: {row[1]}"
        assert set(ticks(row[2])) == set(grants.subscribe), f"{role} subscribe: {row[2]}"
        assert set(ticks(row[3])) == set(grants.retain), f"{role} retain: {row[3]}"
        assert row[5].startswith("yes") == grants.shared_subscriptions, f"{role}: {row[5]}"
        own = policy.allows(principal, Action.WILL, "fl/t/d/status", retain=True)
        other = policy.allows(principal, Action.WILL, "fl/t/x/status", retain=True)
        expected = {(True, False): ("own status",), (True, True): ("any",)}.get(
            (own, other), ("none", "—")
        )
        assert any(word in row[4] for word in expected), f"{role} Will: {row[4]}"


# -- payloads ------------------------------------------------------------------------------


def test_every_model_and_field_is_in_the_payload_table() -> None:
    rows = by_key(table_after(section("Payloads"), "| model |"))
    assert set(rows) == {model.__name__ for model in MODELS.values()}
    for model in MODELS.values():
        cell = set(ticks(rows[model.__name__][1]))
        missing = set(model.model_fields) - cell
        assert not missing, f"{model.__name__} fields missing from the table: {missing}"


def test_every_json_schema_file_is_named() -> None:
    text = section("Payloads")
    files = sorted(p.name for p in (REPO / "schemas" / "json").glob("*.schema.json"))
    assert files
    for name in files:
        assert name in text, name


# -- storage -------------------------------------------------------------------------------

_CREATE = re.compile(
    r"CREATE TABLE IF NOT EXISTS [^.\s]+\.(\w+)\s*\((.*?)\n\s*\)", re.DOTALL | re.IGNORECASE
)
_ADD = re.compile(r"ALTER TABLE [^.\s]+\.(\w+) ADD COLUMN IF NOT EXISTS (\w+)", re.IGNORECASE)
_HYPERTABLE = re.compile(r"create_hypertable\('[^.']+\.(\w+)'")
_CONSTRAINTS = {"UNIQUE", "PRIMARY", "CHECK", "CONSTRAINT", "FOREIGN", "EXCLUDE"}


def migrated_tables(scope: str) -> dict[str, set[str]]:
    """Table -> columns, as the migrations of `scope` (`tenant` or `shared`) leave them."""
    sources = [p.read_text() for p in sorted(MIGRATIONS.glob(f"{scope}_*.sql"))]
    if scope == "shared":  # the runner creates its own bookkeeping table
        sources.append((REPO / "ingest_worker" / "migrate.py").read_text())
    tables: dict[str, set[str]] = {}
    for sql in sources:
        for name, body in _CREATE.findall(sql):
            columns = tables.setdefault(name, set())
            for line in body.splitlines():
                word = line.strip().split(" ", 1)[0]
                if word and word.upper() not in _CONSTRAINTS and not word.startswith("--"):
                    columns.add(word)
        for name, column in _ADD.findall(sql):
            tables[name].add(column)
    return tables


def hypertables(scope: str) -> set[str]:
    return {
        name
        for p in MIGRATIONS.glob(f"{scope}_*.timescale.sql")
        for name in _HYPERTABLE.findall(p.read_text())
    }


@pytest.mark.parametrize(
    ("scope", "marker"),
    [("tenant", "**Tenant schema**"), ("shared", "**Shared schema**")],
    ids=["tenant", "shared"],
)
def test_every_table_and_column_of_the_migrations_is_documented(scope: str, marker: str) -> None:
    tables = migrated_tables(scope)
    assert len(tables) >= 4, tables  # the parser found the migrations' tables
    rows = by_key(table_after(section("Storage"), marker))
    assert set(rows) == set(tables)
    chunked = hypertables(scope)
    assert chunked
    for name, columns in tables.items():
        assert set(ticks(rows[name][1])) == columns, f"{name}: {rows[name][1]}"
        assert ("hypertable" in rows[name][2]) == (name in chunked), f"{name}: {rows[name][2]}"


def test_the_dead_letter_reasons_are_exactly_the_codes() -> None:
    codes = {r.value for r in Reason}
    for module in (ingest_worker.decode, ingest_worker.admission):
        codes |= {
            value
            for name, value in vars(module).items()
            if name.isupper() and isinstance(value, str) and re.fullmatch(r"[a-z_]+", value)
        }
    rows = table_after(section("Storage"), "**Dead letters.**")
    documented = [code for row in rows for code in ticks(row[0])]
    assert len(documented) == len(set(documented))
    assert set(documented) == codes


# -- commands ------------------------------------------------------------------------------

NOW = datetime(2025, 6, 1, tzinfo=UTC).timestamp()
TOPIC = "fl/t/d/cmd/reset"


def _command(**fields: Any) -> bytes:
    body = {"id": str(uuid.uuid4()), "name": "reset", **fields}
    return json.dumps({k: v for k, v in body.items() if v is not None}).encode()


def _answer(intake: CommandIntake, payload: bytes, retained: bool = False) -> str:
    return intake.answer(TOPIC, payload, retained, lambda name, args: "done")[1]


def test_the_command_refusals_and_their_answers_are_the_intakes() -> None:
    rows = by_key(table_after(section("Commands run at most once")))
    assert set(rows) == {r.value for r in Refusal}
    intake = CommandIntake(clock=lambda: NOW)
    ms = int(NOW * 1000)
    policy = intake.policy
    repeated = _command(ts=ms)
    _answer(intake, repeated)
    answers = {
        Refusal.RETAINED: _answer(intake, _command(ts=ms), retained=True),
        Refusal.DUPLICATE: _answer(intake, repeated),
        Refusal.NO_TS: _answer(intake, _command()),
        Refusal.FUTURE_TS: _answer(
            intake, _command(ts=ms + int(policy.max_clock_skew_s + 5) * 1000)
        ),
        Refusal.EXPIRED: _answer(intake, _command(ts=ms - (policy.default_ttl_s + 5) * 1000)),
    }
    assert intake.refused == {r.value: 1 for r in Refusal}  # each case was the refusal named
    for refusal, status in answers.items():
        assert ticks(rows[refusal.value][2]) == [status], refusal


# -- defaults ------------------------------------------------------------------------------


def _rendered_mosquitto() -> dict[str, str]:
    path = Path("/nonexistent")
    files = MosquittoFiles(path, path, path, path, path, path)
    config = render_config(files, MosquittoOptions(persistence_dir=path))
    return dict(line.split(" ", 1) for line in config.splitlines() if line and line[0] != "#")


def test_the_defaults_table_matches_the_settings_and_the_rendered_mosquitto() -> None:
    rows = table_after(section("Defaults this contract relies on"))
    assert len(rows) >= 20
    mosquitto = _rendered_mosquitto()
    for row in rows:
        key = ticks(row[0])[0]
        number = re.match(r"[\d,]+(?:\.\d+)?", row[1])
        assert number is not None, row
        documented = float(number[0].replace(",", ""))
        if "(Mosquitto)" in row[0]:
            actual: object = mosquitto[key]
        else:
            section_name, field = key.split(".")
            actual = getattr(Settings.model_fields[section_name].default, field)
        assert documented == float(actual), f"{key}: the doc says {number[0]}, the code {actual}"
