"""The exported JSON Schema files (committed, current, correct) and `fieldline schemas` CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from schemas.cli import app
from schemas.errors import PayloadError
from schemas.export import (
    DEFAULT_DIR,
    SCHEMA_FILES,
    check_json_schemas,
    export_json_schemas,
    render,
)
from schemas.messages import decode
from schemas.topics import Kind

UUID_TEXT = "6f1c3c3e-8f0a-4a8e-9d55-2b7c1f0e4a10"
FILES = sorted(SCHEMA_FILES)
KIND_OF_FILE = {
    "telemetry.schema.json": Kind.TELEMETRY,
    "status.schema.json": Kind.STATUS,
    "command.schema.json": Kind.COMMAND,
    "command-result.schema.json": Kind.COMMAND_RESULT,
    "event.schema.json": Kind.EVENTS,
}
# Per file: payloads both the schema and the decoder accept, and ones both refuse.
EXAMPLES: dict[str, tuple[list[Any], list[Any]]] = {
    "telemetry.schema.json": (
        [
            {
                "ts": 1732269600123,
                "seq": 17,
                "boot": 3,
                "metrics": {"temperature": 21.43, "on": True, "mode": "auto"},
            },
            {"metrics": {"humidity": {"v": 45.1, "u": "%RH"}, "n": {"v": 1}}},
            {"boot": 1, "samples": [{"ts": "2024-11-22T10:00:00Z", "metrics": {"a": 1}}]},
        ],
        [
            {"metrics": {}},
            {"metrics": {"a": None}},
            {"metrics": {"a": [1]}},
            {"metrics": {"a": {"v": 1, "x": 2}}},
            {"metrics": {"Bad Name": 1}},
            {"metrics": {"a": 1}, "extra": 1},
            {"metrics": {"a": 1}, "samples": [{"ts": 1732269600123, "metrics": {"a": 1}}]},
            {"ts": 1732269600123, "samples": [{"ts": 1732269600123, "metrics": {"a": 1}}]},
            {"samples": [{"metrics": {"a": 1}}]},
            {"ts": True, "metrics": {"a": 1}},
            {"ts": "2024-11-22T10:00:00", "metrics": {"a": 1}},
            {"ts": 1732269600, "metrics": {"a": 1}},
            {"seq": -1, "metrics": {"a": 1}},
            {},
            [],
        ],
    ),
    "status.schema.json": (
        [{"state": "online", "ts": 1732269600123, "boot": 3, "fw": "1.0.0"}, {"state": "offline"}],
        [{"state": "on"}, {}, {"state": "online", "fw": ""}, {"state": "online", "x": 1}],
    ),
    "command.schema.json": (
        [
            {"id": UUID_TEXT, "name": "reset", "args": {"hard": True}, "ttl_s": 60},
            {"id": UUID_TEXT, "name": "set-interval"},
        ],
        [
            {"id": "42", "name": "reset"},
            {"id": UUID_TEXT, "name": "Reset"},
            {"id": UUID_TEXT, "name": "reset", "ttl_s": 0},
            {"id": UUID_TEXT, "name": "reset", "args": []},
            {"name": "reset"},
        ],
    ),
    "command-result.schema.json": (
        [{"id": UUID_TEXT, "status": "ok", "detail": "done", "ts": "2024-11-22T10:00:00Z"}],
        [{"id": UUID_TEXT, "status": "done"}, {"id": UUID_TEXT}, {"status": "ok"}],
    ),
    "event.schema.json": (
        [
            {"kind": "threshold", "severity": "warning", "message": "hot", "data": {"v": 81}},
            {"kind": "door-open"},
        ],
        [{"severity": "info"}, {"kind": "x", "severity": "loud"}, {"kind": "Over Temp"}],
    ),
}


def test_committed_schema_files_are_current() -> None:
    stale = check_json_schemas(DEFAULT_DIR)
    assert not stale, (
        f"schemas/json is out of date ({', '.join(stale)}): run `fieldline schemas export` "
        "and commit the result"
    )


@pytest.mark.parametrize("name", FILES)
def test_schema_file_format(name: str) -> None:
    text = render(name)
    doc = json.loads(text)
    assert text == json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    assert doc["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert doc["$id"] == f"urn:fieldline:schemas:{name}"
    assert doc["title"].startswith("fieldline ")
    assert "fl/{tenant}/{device}/" in doc["description"]
    assert doc["additionalProperties"] is False
    assert render(name) == text  # deterministic


def test_export_writes_and_check_detects_stale_and_missing(tmp_path: Path) -> None:
    out = tmp_path / "json"
    assert sorted(check_json_schemas(out)) == FILES  # nothing there yet
    written = export_json_schemas(out)
    assert sorted(p.name for p in written) == FILES
    assert all(p.read_text(encoding="utf-8") == render(p.name) for p in written)
    assert check_json_schemas(out) == []
    (out / "status.schema.json").write_text("{}\n", encoding="utf-8")
    (out / "event.schema.json").unlink()
    assert check_json_schemas(out) == ["status.schema.json", "event.schema.json"]
    export_json_schemas(out)
    assert check_json_schemas(out) == []


@pytest.mark.parametrize("name", FILES)
def test_examples_agree_with_the_decoder(name: str) -> None:
    good, bad = EXAMPLES[name]
    for payload in good:
        decode(KIND_OF_FILE[name], json.dumps(payload).encode())
    for payload in bad:
        with pytest.raises(PayloadError):
            decode(KIND_OF_FILE[name], json.dumps(payload).encode())


@pytest.mark.parametrize("name", FILES)
def test_exported_schemas_accept_good_and_reject_bad_examples(name: str) -> None:
    jsonschema = pytest.importorskip(
        "jsonschema", reason="jsonschema is not installed (not a dependency of fieldline)"
    )
    doc = json.loads(render(name))
    validator_cls = jsonschema.Draft202012Validator
    validator_cls.check_schema(doc)
    validator = validator_cls(doc, format_checker=validator_cls.FORMAT_CHECKER)
    good, bad = EXAMPLES[name]
    for payload in good:
        errors = [e.message for e in validator.iter_errors(payload)]
        assert not errors, f"{payload} refused: {errors}"
    for payload in bad:
        assert not validator.is_valid(payload), f"{payload} accepted by {name}"


# --- CLI -------------------------------------------------------------------------------

runner = CliRunner()


@pytest.mark.parametrize("command", [[], ["export"], ["topics"], ["validate"]])
def test_every_command_has_help(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    if command:
        callbacks = {c.name: c.callback for c in app.registered_commands}
        callback = callbacks[command[0]]
        assert callback is not None
        doc = callback.__doc__
        assert doc
        # The summary line is shown, however the terminal width wraps it.
        assert " ".join(doc.splitlines()[0].split()) in " ".join(result.output.split())


def test_cli_export_and_check(tmp_path: Path) -> None:
    out = tmp_path / "json"
    result = runner.invoke(app, ["export", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == FILES
    result = runner.invoke(app, ["export", "--out", str(out), "--check"])
    assert result.exit_code == 0, result.output
    assert "up to date" in result.output
    (out / "command.schema.json").write_text("stale\n", encoding="utf-8")
    result = runner.invoke(app, ["export", "--out", str(out), "--check"])
    assert result.exit_code == 1
    assert "command.schema.json" in result.output
    assert "run `fieldline schemas export`" in result.output
    assert (out / "command.schema.json").read_text(encoding="utf-8") == "stale\n"  # untouched


def test_cli_check_of_the_shipped_files() -> None:
    result = runner.invoke(app, ["export", "--check"])
    assert result.exit_code == 0, result.output


def test_cli_topics() -> None:
    result = runner.invoke(app, ["topics", "acme", "pump-1"])
    assert result.exit_code == 0, result.output
    for expected in (
        "fl/acme/pump-1/telemetry",
        "fl/acme/pump-1/status",
        "fl/acme/pump-1/events",
        "fl/acme/pump-1/cmd-res",
        "fl/acme/pump-1/cmd/{name}",
        "subscribe  fl/acme/pump-1/cmd/#",
    ):
        assert expected in result.output


def test_cli_topics_refuses_bad_ids() -> None:
    result = runner.invoke(app, ["topics", "acme", "Pump/1"])
    assert result.exit_code == 2
    assert "device id 'Pump/1' is invalid: '/' is not allowed" in result.output


def test_cli_validate_good_file(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    path.write_text(
        '{"ts": "2024-11-22T10:00:00.123Z", "seq": 3, '
        '"metrics": {"on": true, "t": {"v": 21.5, "u": "degC"}}}'
    )
    result = runner.invoke(app, ["validate", "telemetry", str(path)])
    assert result.exit_code == 0, result.output
    assert "valid telemetry payload" in result.output
    assert '"ts": 1732269600123' in result.output
    assert "on=1.0  [bool]" in result.output
    assert "t=21.5 degC  [numeric]" in result.output


def test_cli_validate_from_stdin_and_other_kinds() -> None:
    payload = json.dumps({"id": UUID_TEXT, "name": "reset"})
    result = runner.invoke(app, ["validate", "cmd", "-"], input=payload)
    assert result.exit_code == 0, result.output
    assert UUID_TEXT in result.output


def test_cli_validate_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"metrics": {"t": NaN}}')
    result = runner.invoke(app, ["validate", "telemetry", str(path)])
    assert result.exit_code == 1
    assert "invalid telemetry payload [invalid]: metrics.t: NaN is not a value" in result.output


def test_cli_validate_missing_file_and_bad_kind(tmp_path: Path) -> None:
    result = runner.invoke(app, ["validate", "status", str(tmp_path / "nope.json")])
    assert result.exit_code == 2
    assert "cannot read" in result.output
    result = runner.invoke(app, ["validate", "metrics", str(tmp_path / "nope.json")])
    assert result.exit_code == 2
    assert "telemetry" in result.output  # the choices are listed
