"""Manifest validation of `modbus` modules: each mistake is one line naming its key."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from edge_agent.errors import ManifestError
from edge_agent.manifest import load_manifest, parse_manifest

REPO = Path(__file__).resolve().parents[2]

BASE: dict[str, Any] = {
    "agent": {"id": "gw-1", "tenant": "acme"},
    "modules": [
        {
            "name": "plc",
            "kind": "modbus",
            "host": "127.0.0.1",
            "points": [
                {"metric": "temp", "table": "holding", "address": 0, "type": "float32"},
                {"metric": "speed", "table": "holding", "address": 2, "type": "int16",
                 "scale": 0.1},
                {"metric": "heater", "table": "coil", "address": 0},
            ],
        }
    ],
    "rules": [
        {
            "name": "hot",
            "metric": "temp",
            "window": {"kind": "tumbling", "size_s": 5},
            "aggregate": "avg",
            "condition": {"op": ">", "value": 80},
            "command": {"name": "write-coil", "args": {"point": "heater", "value": False}},
        }
    ],
    "routes": [
        {"name": "up", "from": "plc", "to": "upstream"},
        {"name": "toRule", "from": "plc", "to": "rules/hot"},
        {"name": "off", "from": "rules/hot", "to": "plc"},
    ],
}  # fmt: skip


def _problems(change: Any) -> list[tuple[str, str]]:
    data = copy.deepcopy(BASE)
    change(data)
    with pytest.raises(ManifestError) as caught:
        parse_manifest(data, "edge.toml")
    return caught.value.problems


def _point(**keys: Any) -> Any:
    def change(data: dict[str, Any]) -> None:
        data["modules"][0]["points"][0].update(keys)

    return change


def _module(**keys: Any) -> Any:
    def change(data: dict[str, Any]) -> None:
        data["modules"][0].update(keys)

    return change


def test_the_base_manifest_is_valid_and_defaults_the_port_to_502() -> None:
    manifest = parse_manifest(copy.deepcopy(BASE), "edge.toml")
    plc = manifest.module("plc")
    assert (plc.modbus_port, plc.unit_id, plc.max_gap) == (502, 1, 0)
    assert [p.storage_kind for p in plc.points] == ["numeric", "numeric", "bool"]
    assert plc.points[0].layout.span.count == 2
    data = copy.deepcopy(BASE)
    data["modules"][0]["port"] = 5020
    assert parse_manifest(data, "edge.toml").module("plc").modbus_port == 5020


def test_the_example_manifest_is_valid() -> None:
    manifest = load_manifest(REPO / "edge_agent" / "examples" / "modbus-plc.toml")
    assert manifest.module("plc").kind == "modbus"


@pytest.mark.parametrize(
    ("change", "path", "words"),
    [
        (_point(type="float16"), "modules[0].points[0].type", "'float32'"),
        (_point(word_order="middle"), "modules[0].points[0].word_order", "'big' or 'little'"),
        (_point(byte_order="mixed"), "modules[0].points[0].byte_order", "'big' or 'little'"),
        (_point(address=70000), "modules[0].points[0].address", "<= 65535"),
        (_point(address=-1), "modules[0].points[0].address", ">= 0"),
        (_point(address=65535), "modules[0].points[0].address", "runs past 65535"),
        (_point(table="register"), "modules[0].points[0].table", "'holding'"),
        (_point(scale=0.0), "modules[0].points[0].scale", "must not be 0"),
        (_point(colour="red"), "modules[0].points[0].colour", "unknown key"),
        (_point(metric="speed"), "modules[0].points[1].metric", "already the metric of points[0]"),
        (_point(metric="t" * 61), "modules[0].points[0].metric", "longer than 64"),
        (_module(unit_id=248), "modules[0].unit_id", "<= 247"),
        (_module(unit_id=-1), "modules[0].unit_id", ">= 0"),
        (_module(host=None), "modules[0].host", "is required for kind 'modbus'"),
        (_module(points=[]), "modules[0].points", "is required for kind 'modbus'"),
        (_module(max_gap=500), "modules[0].max_gap", "<= 100"),
        (_module(server_cert="x"), "modules[0].server_cert", "does not apply to kind 'modbus'"),
    ],
    ids=[
        "unknown-type", "odd-word-order", "odd-byte-order", "address-too-high",
        "address-negative", "float-past-the-end", "unknown-table", "zero-scale", "unknown-key",
        "duplicate-metric", "metric-too-long", "unit-id-too-high", "unit-id-negative",
        "no-host", "no-points", "gap-too-wide", "listener-key",
    ],
)  # fmt: skip
def test_each_mistake_is_one_line_naming_its_key(change: Any, path: str, words: str) -> None:
    problems = _problems(change)
    texts = [text for where, text in problems if where == path]
    assert len(texts) == 1, problems
    assert words in texts[0]
    assert "\n" not in texts[0]


def test_register_keys_on_a_coil_are_refused() -> None:
    def float_coil(data: dict[str, Any]) -> None:
        data["modules"][0]["points"][2].update(type="float32", scale=2.0)

    problems = dict(_problems(float_coil))
    assert (
        "a coil is one bit (a boolean): type 'float32' does not apply"
        in (problems["modules[0].points[2].type"])
    )
    assert "modules[0].points[2].scale" in problems


def test_word_order_on_a_16_bit_register_is_refused() -> None:
    ((where, text),) = _problems(_point(type="int16", word_order="little"))
    assert where == "modules[0].points[0].word_order"
    assert "32- and 64-bit" in text


def test_points_belong_to_modbus_modules_only() -> None:
    def on_machine(data: dict[str, Any]) -> None:
        data["modules"].append({"name": "m", "kind": "machine", "unit_id": 3})
        data["routes"].append({"name": "m", "from": "m", "to": "upstream"})

    ((where, text),) = _problems(on_machine)
    assert where == "modules[1].unit_id"
    assert "does not apply to kind 'machine'" in text


@pytest.mark.parametrize(
    ("command", "words"),
    [
        ({"name": "write-coil", "args": {"point": "temp", "value": False}}, "use write-register"),
        ({"name": "write-register", "args": {"point": "speed", "value": 1e6}}, "outside"),
        ({"name": "reset"}, "takes write-coil and write-register"),
    ],
)
def test_a_rule_s_command_must_suit_the_modbus_module(command: dict[str, Any], words: str) -> None:
    def change(data: dict[str, Any]) -> None:
        data["rules"][0]["command"] = command

    ((where, text),) = _problems(change)
    assert where == "rules[0].command"
    assert words in text
    assert "for 'plc'" in text
