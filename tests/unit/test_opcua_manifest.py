"""The `opcua` module kind in the manifest, its commands, and every example manifest."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from edge_agent.errors import ManifestError
from edge_agent.manifest import parse_manifest
from edge_agent.opcua_spec import parse_command

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "edge_agent" / "examples").glob("*.toml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_passes_fieldline_edge_check(path: Path) -> None:
    from edge_agent.cli import app

    result = CliRunner().invoke(app, ["check", "--manifest", str(path)])
    assert result.exit_code == 0, result.output
    assert "valid:" in result.output


def test_the_opcua_example_is_among_them() -> None:
    assert "opcua-machine.toml" in [p.name for p in EXAMPLES]


def _manifest(module: dict[str, Any], command: dict[str, Any] | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {
        "agent": {"id": "gw-1", "tenant": "acme"},
        "modules": [{"name": "machine", "kind": "opcua", **module}],
        "routes": [{"name": "up", "from": "machine", "to": "upstream"}],
    }
    if command is not None:
        data["rules"] = [{
            "name": "hot", "metric": "temperature", "window": {"kind": "tumbling", "size_s": 1},
            "aggregate": "avg", "condition": {"op": ">", "value": 70}, "command": command,
        }]  # fmt: skip
        data["routes"] += [
            {"name": "in", "from": "machine", "to": "rules/hot"},
            {"name": "out", "from": "rules/hot", "to": "machine"},
        ]
    return data


GOOD = {
    "url": "opc.tcp://plc:4840",
    "nodes": [{"node": "ns=2;s=Machine.Temperature", "metric": "temperature"}],
}


def _problems(module: dict[str, Any], command: dict[str, Any] | None = None) -> str:
    with pytest.raises(ManifestError) as caught:
        parse_manifest(_manifest(module, command), "m.toml")
    return str(caught.value)


def test_a_good_opcua_module_and_its_command_pass() -> None:
    call = {"name": "call", "args": {"object": "ns=2;s=Machine", "method": "2:Reset"}}
    manifest = parse_manifest(_manifest(GOOD, call), "m.toml")
    assert manifest.modules[0].field


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"url": "http://plc:4840"}, "modules[0].url: 'http://plc:4840' is not an OPC UA endpoint"),
        ({"url": "opc.tcp://plc"}, "names no port; OPC UA's default is 4840"),
        ({"url": None}, "modules[0].url: is required for kind 'opcua'"),
        ({"security_mode": "Encrypt"}, "modules[0].security_mode: must be 'None', 'Sign' or"),
        ({"security_mode": "SignAndEncrypt"}, "needs the server's certificate: server_trust"),
        ({"server_trust": "s.der"}, "applies only with security_mode 'Sign' or"),
        ({"nodes": []}, "modules[0].nodes: is required"),
        (
            {"nodes": [{"node": "ns=2;s=A", "metric": "t"}, {"path": "2:B", "metric": "t"}]},
            "modules[0].nodes[1].metric: 't' is already the metric of nodes[0]",
        ),
        ({"nodes": [{"node": "Machine.Temp", "metric": "t"}]}, "is not a NodeId string"),
        ({"nodes": [{"path": "Machine/Temp", "metric": "t"}]}, "is not a browse path"),
        ({"nodes": [{"metric": "t"}]}, "give exactly one of node"),
        ({"interval_s": 2.0}, "modules[0].interval_s: does not apply to mode 'subscribe'"),
        ({"mode": "poll", "sampling_interval_s": 1.0}, "does not apply to mode 'poll'"),
    ],
)
def test_opcua_mistakes_are_named_by_key(change: dict[str, Any], expected: str) -> None:
    module = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    assert expected in _problems(module)


def test_a_rule_command_an_opcua_module_cannot_run_is_named() -> None:
    text = _problems(GOOD, {"name": "reset"})
    assert "rules[0].command: for 'machine': an opcua module takes 'write' or 'call'" in text
    text = _problems(GOOD, {"name": "write", "args": {"node": "ns=2;s=X"}})
    assert "bad write arguments: value" in text


def test_the_opcua_keys_do_not_apply_to_other_kinds() -> None:
    data = _manifest(GOOD)
    data["modules"][0] = {"name": "machine", "kind": "machine", "url": "opc.tcp://plc:4840"}
    with pytest.raises(ManifestError, match=r"modules\[0\].url: does not apply to kind 'machine'"):
        parse_manifest(data, "m.toml")


def test_commands_parse() -> None:
    assert parse_command("write", {"node": "temperature", "value": 1.5}).value == 1.5
    call = parse_command("call", {"object": "ns=2;i=5", "method": "2:Reset", "args": [1, "x"]})
    assert call.args == [1, "x"]
    with pytest.raises(ValueError, match="'write' or 'call'"):
        parse_command("launch", {})


def test_values_convert_by_kind_and_a_nan_is_no_value() -> None:
    from edge_agent.opcua import convert

    assert convert(21.5, "numeric") == 21.5
    assert convert(True, "numeric") == 1.0
    assert convert(float("nan"), "numeric") is None
    assert convert("on", "numeric") is None
    assert convert(3, "text") == "3"
    assert convert(1, "bool") is True
    assert convert([1, 2], "numeric") is None


def test_trust_is_the_certificate_itself_or_its_issuer(tmp_path: Path) -> None:
    from asyncua.crypto import cert_gen
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from edge_agent.opcua import is_trusted

    def make(name: str) -> x509.Certificate:
        key = cert_gen.generate_private_key()
        return cert_gen.generate_self_signed_app_certificate(
            key, name, {}, [x509.UniformResourceIdentifier(f"urn:{name}")],
            extended=[ExtendedKeyUsageOID.SERVER_AUTH], days=1,
        )  # fmt: skip

    server, other = make("server"), make("other")
    assert is_trusted(server, [other, server])
    assert not is_trusted(server, [other])
    assert not is_trusted(server, [])
    assert server.not_valid_after_utc > datetime.datetime.now(datetime.UTC)
