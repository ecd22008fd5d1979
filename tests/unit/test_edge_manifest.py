"""The edge manifest: the shipped example, defaults, helpers, every kind of error by key path."""

from __future__ import annotations

import copy
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edge_agent.errors import EdgeError, ManifestError
from edge_agent.manifest import Manifest, load_manifest, parse_manifest
from schemas.messages import Severity

EXAMPLE = Path(__file__).resolve().parents[2] / "edge_agent" / "examples" / "machine-reset.toml"


def _example() -> dict[str, Any]:
    with EXAMPLE.open("rb") as file:
        return tomllib.load(file)


def _parse(change: Callable[[dict[str, Any]], object]) -> Manifest:
    data = copy.deepcopy(_example())
    change(data)
    return parse_manifest(data, "edge.toml")


def _error(change: Callable[[dict[str, Any]], object]) -> ManifestError:
    with pytest.raises(ManifestError) as info:
        _parse(change)
    return info.value


# --- the shipped example -----------------------------------------------------------------


def test_the_shipped_example_expresses_the_source_design() -> None:
    manifest = load_manifest(EXAMPLE)
    assert manifest.source == str(EXAMPLE)
    assert (manifest.agent.id, manifest.agent.tenant) == ("gw-1", "acme")
    routes = [(r.name, r.from_, r.to) for r in manifest.routes]
    assert routes == [
        ("telemetryToCloud", "machine", "upstream"),
        ("telemetryToRules", "machine", "rules/overheat"),
        ("alertsToCloud", "rules/overheat", "upstream"),
        ("alertsToReset", "rules/overheat", "machine"),
    ]
    machine = manifest.module("machine")
    assert (machine.kind, machine.interval_s, machine.simulated) == ("machine", 1.0, True)
    rule = manifest.rule("overheat")
    assert (rule.metric, rule.aggregate, rule.for_windows) == ("machine_temperature", "avg", 1)
    assert (rule.window.kind, rule.window.size_ms, rule.window.hop_ms) == (
        "tumbling",
        30_000,
        30_000,
    )
    assert rule.condition.holds(70.5)
    assert not rule.condition.holds(70)
    assert rule.event is not None
    assert rule.event.severity is Severity.WARNING
    assert rule.command is not None
    assert (rule.command.name, rule.command.args) == ("reset", {})
    assert rule.ref == "rules/overheat"


def test_route_helpers_name_their_endpoints() -> None:
    manifest = load_manifest(EXAMPLE)
    assert [r.name for r in manifest.routes_from("machine")] == [
        "telemetryToCloud",
        "telemetryToRules",
    ]
    to_cloud, to_reset = manifest.routes_from("rules/overheat")
    assert (to_cloud.from_rule, to_cloud.to_upstream, to_cloud.to_module) == (
        "overheat",
        True,
        None,
    )
    assert (to_reset.to_upstream, to_reset.to_module, to_reset.to_rule) == (False, "machine", None)
    assert manifest.routes_from("machine")[1].to_rule == "overheat"
    assert manifest.routes_from("nothing") == []
    with pytest.raises(KeyError, match="mixer"):
        manifest.module("mixer")
    with pytest.raises(KeyError, match="cold"):
        manifest.rule("cold")


def test_defaults_and_paths_under_the_data_directory(tmp_path: Path) -> None:
    manifest = load_manifest(EXAMPLE)
    assert (manifest.broker.host, manifest.broker.port, manifest.broker.keepalive_s) == (
        "127.0.0.1",
        8883,
        30,
    )
    assert (manifest.outbox.max_bytes, manifest.outbox.batch_samples) == (50_000_000, 100)
    assert manifest.bundle_dir(tmp_path) == tmp_path / "pki" / "issued" / "gw-1"
    assert manifest.outbox_path(tmp_path) == tmp_path / "edge" / "gw-1" / "outbox.sqlite"

    def elsewhere(data: dict[str, Any]) -> None:
        data["agent"]["bundle"] = "/etc/fieldline/gw-1"
        data["outbox"] = {"path": "/var/lib/fl/outbox.sqlite", "batch_samples": 10}

    moved = _parse(elsewhere)
    assert moved.bundle_dir(tmp_path) == Path("/etc/fieldline/gw-1")
    assert moved.outbox_path(tmp_path) == Path("/var/lib/fl/outbox.sqlite")
    assert moved.outbox.batch_samples == 10


def test_hopping_windows_listeners_and_between_conditions_parse() -> None:
    def extend(data: dict[str, Any]) -> None:
        data["modules"].append({"name": "lan", "kind": "listener", "port": 1885})
        data["modules"].append({"name": "room", "kind": "arma", "sensors": 3, "interval_s": 5})
        data["rules"].append(
            {
                "name": "comfort",
                "metric": "temperature",
                "window": {"kind": "hopping", "size_s": 60, "hop_s": 15},
                "aggregate": "min",
                "condition": {"op": "between", "low": 18, "high": 24.5},
                "for_windows": 2,
                "lateness_s": 2.5,
                "event": {"kind": "comfort", "severity": "info"},
            }
        )
        data["routes"] += [
            {"name": "lanUp", "from": "lan", "to": "upstream"},
            {"name": "roomUp", "from": "room", "to": "rules/comfort"},
            {"name": "comfortUp", "from": "rules/comfort", "to": "upstream"},
        ]

    manifest = _parse(extend)
    rule = manifest.rule("comfort")
    assert (rule.window.size_ms, rule.window.hop_ms, rule.lateness_ms) == (60_000, 15_000, 2500)
    assert rule.condition.holds(18)
    assert rule.condition.holds(24.5)
    assert not rule.condition.holds(24.6)
    assert rule.condition.describe() == "between 18 and 24.5"
    lan = manifest.module("lan")
    assert (lan.port, lan.bind, lan.simulated) == (1885, "127.0.0.1", False)
    assert manifest.module("room").sensors == 3


# --- errors: each names the file and the key path ----------------------------------------


def _set(section: str, index: int, **values: Any) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        data[section][index].update(values)

    return change


def _window(**window: Any) -> Callable[[dict[str, Any]], None]:
    return _set("rules", 0, window=window)


def _drop(section: str, index: int, key: str) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        del data[section][index][key]

    return change


def _append(section: str, item: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        data[section].append(item)

    return change


ROUTE = {"name": "more", "from": "machine", "to": "upstream"}
CASES: list[tuple[str, Callable[[dict[str, Any]], object], str, str]] = [
    ("unknown-module-from", _set("routes", 0, **{"from": "mill"}), "routes[0].from", "mill"),
    ("route-to-nowhere", _set("routes", 3, to="mixer"), "routes[3].to", "route to nowhere"),
    ("typo-suggests", _set("routes", 3, to="machin"), "routes[3].to", "did you mean 'machine'"),
    ("unknown-rule-to", _set("routes", 1, to="rules/overheet"), "routes[1].to", "overheet"),
    ("unknown-rule-from", _set("routes", 2, **{"from": "rules/hot"}), "routes[2].from", "hot"),
    (
        "upstream-as-source",
        _set("routes", 2, **{"from": "upstream"}),
        "routes[2].from",
        "no source",
    ),
    ("window-of-zero", _window(kind="tumbling", size_s=0), "rules[0].window.size_s", "> 0"),
    ("negative-window", _window(kind="tumbling", size_s=-30), "rules[0].window.size_s", "> 0"),
    ("sub-millisecond", _window(kind="tumbling", size_s=1e-4), "rules[0].window.size_s", "milli"),
    ("zero-hop", _window(kind="hopping", size_s=30, hop_s=0), "rules[0].window.hop_s", "> 0"),
    ("hop-over-size", _window(kind="hopping", size_s=30, hop_s=40), "rules[0].window.hop_s", "<="),
    ("hopping-no-hop", _window(kind="hopping", size_s=30), "rules[0].window.hop_s", "needs"),
    ("tumbling-hop", _window(kind="tumbling", size_s=30, hop_s=10), "rules[0].window.hop_s", "hop"),
    ("tiny-hop", _window(kind="hopping", size_s=3600, hop_s=1), "rules[0].window.hop_s", "1000"),
    ("window-kind", _window(kind="sliding", size_s=3), "rules[0].window.kind", "'hopping'"),
    (
        "dup-module",
        _append("modules", {"name": "machine", "kind": "pico"}),
        "modules[1].name",
        "already",
    ),
    (
        "dup-route",
        _append("routes", {**ROUTE, "name": "alertsToCloud"}),
        "routes[4].name",
        "already",
    ),
    ("dup-route-pair", _append("routes", ROUTE), "routes[4]", "repeats routes[0]"),
    (
        "typo-key",
        _set("rules", 0, window={"kind": "tumbling", "sise_s": 3}),
        "rules[0].window.sise_s",
        "did you mean 'size_s'",
    ),
    ("typo-route-key", _set("routes", 0, too="upstream"), "routes[0].too", "unknown key"),
    ("typo-section", lambda d: d.update(outbx={}), "outbx", "did you mean 'outbox'"),
    ("bad-device-id", lambda d: d["agent"].update(id="GW 1"), "agent.id", "uppercase"),
    ("bad-tenant-id", lambda d: d["agent"].update(tenant="a/b"), "agent.tenant", "'/'"),
    ("bad-module-name", _set("modules", 0, name="Machine"), "modules[0].name", "'Machine'"),
    (
        "bad-metric",
        _set("rules", 0, metric="machine temperature"),
        "rules[0].metric",
        "metric names are",
    ),
    (
        "bad-event-kind",
        _set("rules", 0, event={"kind": "Over Heat"}),
        "rules[0].event.kind",
        "event kind",
    ),
    (
        "bad-severity",
        _set("rules", 0, event={"kind": "x", "severity": "meh"}),
        "rules[0].event.severity",
        "warning",
    ),
    ("unknown-kind", _set("modules", 0, kind="blender"), "modules[0].kind", "'listener'"),
    ("key-of-other-kind", _set("modules", 0, port=1884), "modules[0].port", "kind 'machine'"),
    (
        "interval-too-short",
        _set("modules", 0, interval_s=0.001),
        "modules[0].interval_s",
        ">= 0.01",
    ),
    ("aggregate", _set("rules", 0, aggregate="mean"), "rules[0].aggregate", "'avg'"),
    (
        "op",
        _set("rules", 0, condition={"op": "==", "value": 1}),
        "rules[0].condition.op",
        "'between'",
    ),
    ("op-no-value", _set("rules", 0, condition={"op": ">"}), "rules[0].condition.value", "needs"),
    (
        "between-no-high",
        _set("rules", 0, condition={"op": "between", "low": 1}),
        "rules[0].condition",
        "low and high",
    ),
    (
        "between-inverted",
        _set("rules", 0, condition={"op": "between", "low": 9, "high": 1}),
        "rules[0].condition.low",
        "above",
    ),
    (
        "gt-with-low",
        _set("rules", 0, condition={"op": ">", "value": 1, "low": 0}),
        "rules[0].condition.low",
        "between",
    ),
    ("zero-for-windows", _set("rules", 0, for_windows=0), "rules[0].for_windows", ">= 1"),
    ("negative-lateness", _set("rules", 0, lateness_s=-1), "rules[0].lateness_s", ">= 0"),
    (
        "nan-threshold",
        _set("rules", 0, condition={"op": ">", "value": float("nan")}),
        "rules[0].condition.value",
        "finite",
    ),
    ("string-number", _set("rules", 0, for_windows="2"), "rules[0].for_windows", "integer"),
    ("rule-without-input", lambda d: d["routes"].pop(1), "rules[0]", "no readings"),
    ("rule-without-output", lambda d: d.update(routes=d["routes"][:2]), "rules[0]", "go nowhere"),
    ("command-missing", _drop("rules", 0, "command"), "routes[3].to", "no command"),
    ("event-missing", _drop("rules", 0, "event"), "routes[2].to", "no event"),
    (
        "neither-action",
        lambda d: [d["rules"][0].pop(k) for k in ("event", "command")],
        "rules[0]",
        "neither event nor command",
    ),
    (
        "unknown-command",
        _set("rules", 0, command={"name": "explode"}),
        "rules[0].command",
        "unknown command 'explode'",
    ),
    (
        "bad-command-args",
        _set("rules", 0, command={"name": "reset", "args": {"x": 1}}),
        "rules[0].command",
        "x",
    ),
    ("module-to-module", _set("routes", 0, to="machine"), "routes[0].to", "only a rule"),
    ("rule-to-rule", _set("routes", 2, to="rules/overheat"), "routes[2].to", "another rule"),
    (
        "unused-module",
        _append("modules", {"name": "spare", "kind": "pico"}),
        "modules[1]",
        "no route",
    ),
    (
        "reserved-name",
        lambda d: [d["modules"][0].update(name="upstream")],
        "modules[0].name",
        "reserved",
    ),
    (
        "modules-not-array",
        lambda d: d.update(modules={"name": "m", "kind": "pico"}),
        "modules",
        "[[modules]]",
    ),
    ("no-modules", lambda d: d.update(modules=[]), "modules", "at least 1"),
    ("agent-missing", lambda d: d.pop("agent"), "agent", "required"),
    ("window-not-table", _set("rules", 0, window=30), "rules[0].window", "table"),
    (
        "batch-too-big",
        lambda d: d.update(outbox={"batch_samples": 5000}),
        "outbox.batch_samples",
        "<= 1000",
    ),
]


@pytest.mark.parametrize(
    ("change", "path", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_each_error_names_the_file_and_the_key_path(
    change: Callable[[dict[str, Any]], object], path: str, words: str
) -> None:
    error = _error(change)
    assert isinstance(error, EdgeError)
    assert str(error).startswith("edge.toml: ")
    assert error.source == "edge.toml"
    messages = [text for where, text in error.problems if where == path]
    assert messages, (path, error.problems)
    assert any(words in text for text in messages), (words, error.problems)
    assert f"{path}: " in str(error)


def test_every_problem_is_reported_at_once() -> None:
    def two(data: dict[str, Any]) -> None:
        data["routes"][3]["to"] = "mixer"
        data["rules"][0]["window"] = {"kind": "hopping", "size_s": 30, "hop_s": 60}

    error = _error(two)
    assert [path for path, _ in error.problems] == ["rules[0].window.hop_s", "routes[3].to"]
    assert "2 problems" in str(error)


def test_load_manifest_reports_missing_and_malformed_files(tmp_path: Path) -> None:
    missing = tmp_path / "absent.toml"
    with pytest.raises(ManifestError, match=r"absent\.toml: no such file"):
        load_manifest(missing)
    broken = tmp_path / "broken.toml"
    broken.write_text('[agent]\nid = "gw-1\n')
    with pytest.raises(ManifestError, match=r"broken\.toml: is not valid TOML"):
        load_manifest(broken)
    typo = tmp_path / "typo.toml"
    typo.write_text(EXAMPLE.read_text().replace("size_s = 30", "size_s = 0"))
    with pytest.raises(ManifestError, match=r"typo\.toml: rules\[0\]\.window\.size_s: must be > 0"):
        load_manifest(typo)
