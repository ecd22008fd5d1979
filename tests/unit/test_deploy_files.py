"""deploy/: the systemd units are hardened and run real commands with real settings; the
Prometheus config parses and scrapes the services' ports; the dashboard is well formed."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from core.settings import BrokerSettings, IngestSettings, Settings
from fieldline.cli import app

REPO = Path(__file__).resolve().parents[2]
SYSTEMD = REPO / "deploy" / "systemd"
UNITS = (
    "fieldline-mosquitto.service",
    "fieldline-broker.service",
    "fieldline-ingest@.service",
    "fieldline-edge@.service",
)
CRL_UNIT = "fieldline-crl-renew.service"
CRL_TIMER = "fieldline-crl-renew.timer"
FIELDLINE = "/opt/fieldline/venv/bin/fieldline"
HOME = "/var/lib/fieldline"
runner = CliRunner()


def parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Sections -> (key, value) in order; systemd allows a key several times (Environment)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    # a trailing backslash continues the line (systemd joins them with a space)
    text = re.sub(r"\\\n", " ", path.read_text())
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"{path.name}: {line!r} before any section"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not a key=value line: {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


def values(unit: dict[str, list[tuple[str, str]]], key: str, section: str = "Service") -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def one(unit: dict[str, list[tuple[str, str]]], key: str, section: str = "Service") -> str:
    found = values(unit, key, section)
    assert len(found) == 1, f"{key}: {found}"
    return found[0]


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(s|min)?", value)
    assert match, value
    return int(match[1]) * (60 if match[2] == "min" else 1)


def test_the_units_are_shipped() -> None:
    assert sorted(p.name for p in SYSTEMD.glob("*.service")) == sorted([*UNITS, CRL_UNIT])
    assert sorted(p.name for p in SYSTEMD.glob("*.timer")) == [CRL_TIMER]


@pytest.mark.parametrize("name", UNITS)
def test_every_unit_is_hardened(name: str) -> None:
    unit = parse_unit(SYSTEMD / name)
    user = one(unit, "User")
    assert user not in {"", "root"}
    assert one(unit, "NoNewPrivileges") == "yes"
    assert one(unit, "ProtectSystem") == "strict"
    assert one(unit, "PrivateTmp") == "yes"
    assert one(unit, "Restart") == "on-failure"
    assert seconds(one(unit, "TimeoutStopSec")) >= 30
    assert one(unit, "ReadWritePaths")
    assert one(unit, "WantedBy", "Install") == "multi-user.target"


@pytest.mark.parametrize("name", [n for n in UNITS if n != "fieldline-mosquitto.service"])
def test_fieldline_units_write_only_fieldline_home(name: str) -> None:
    unit = parse_unit(SYSTEMD / name)
    assert one(unit, "User") == "fieldline"
    assert one(unit, "ReadWritePaths") == HOME
    assert f"FIELDLINE_HOME={HOME}" in values(unit, "Environment")


def _setting_exists(env_name: str) -> bool:
    """FIELDLINE_A__B names settings field a.b (prefix FIELDLINE_, nesting __)."""
    parts = env_name.removeprefix("FIELDLINE_").lower().split("__")
    model: Any = Settings
    for part in parts:
        field = model.model_fields.get(part)
        if field is None:
            return False
        model = field.annotation
    return True


@pytest.mark.parametrize("name", [*UNITS, CRL_UNIT])
def test_environment_names_real_settings(name: str) -> None:
    unit = parse_unit(SYSTEMD / name)
    for assignment in values(unit, "Environment"):
        env_name = assignment.partition("=")[0]
        assert env_name.startswith("FIELDLINE_"), assignment
        # unknown FIELDLINE_ variables are silently ignored by pydantic-settings: check here
        assert _setting_exists(env_name), f"{name}: {env_name} is no setting"
    assert not _setting_exists("FIELDLINE_INGEST__NO_SUCH_THING")


@pytest.mark.parametrize(
    "name", ["fieldline-broker.service", "fieldline-ingest@.service", "fieldline-edge@.service"]
)
def test_exec_start_is_a_real_fieldline_command(name: str) -> None:
    argv = shlex.split(one(parse_unit(SYSTEMD / name), "ExecStart"))
    assert argv[0] == "/opt/fieldline/venv/bin/fieldline"
    words = [a for a in argv[1:] if not a.startswith("-")][:2]
    result = runner.invoke(app, [*words, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for flag in (a for a in argv if a.startswith("--")):
        assert flag in result.output, f"{name}: {flag} is not an option of {words}"


def test_ingest_instances_share_one_subscription_with_their_own_identity() -> None:
    unit = parse_unit(SYSTEMD / "fieldline-ingest@.service")
    assert "FIELDLINE_INGEST__IDENTITY=ingest-%i" in values(unit, "Environment")
    argv = shlex.split(one(unit, "ExecStart"))
    assert argv[argv.index("--share-group") + 1] == "ingest"
    # the per-instance file (with the metrics port) is required: no leading "-"
    assert "/etc/fieldline/ingest-%i.env" in values(unit, "EnvironmentFile")
    # the drain commits what the worker holds before it disconnects: give it time
    assert seconds(one(unit, "TimeoutStopSec")) >= 60


def test_edge_instances_run_their_own_manifest() -> None:
    unit = parse_unit(SYSTEMD / "fieldline-edge@.service")
    argv = shlex.split(one(unit, "ExecStart"))
    assert argv[argv.index("--manifest") + 1] == "/etc/fieldline/edge/%i.toml"
    assert argv[argv.index("--metrics-port") + 1] == "${EDGE_METRICS_PORT}"
    assert "/etc/fieldline/edge/%i.env" in values(unit, "EnvironmentFile")


def test_mosquitto_runs_the_rendered_config() -> None:
    text = (SYSTEMD / "fieldline-mosquitto.service").read_text()
    unit = parse_unit(SYSTEMD / "fieldline-mosquitto.service")
    assert one(unit, "User") == "mosquitto"
    assert shlex.split(one(unit, "ExecStart"))[1:] == [
        "-c",
        "/etc/fieldline/mosquitto/mosquitto.conf",
    ]
    assert "kill -HUP $MAINPID" in one(unit, "ExecReload")
    # the render command in its comment uses the config directory the unit runs
    assert "mosquitto-config --out /etc/fieldline/mosquitto" in text
    persistence = re.search(r"--persistence-dir (\S+)", text)
    assert persistence is not None
    assert one(unit, "ReadWritePaths") == persistence[1]


def _prometheus() -> dict[str, Any]:
    text = (REPO / "deploy" / "prometheus.yml").read_text()
    try:
        import yaml
    except ImportError:  # pyyaml is not a dependency: read the targets by pattern instead
        jobs = re.findall(r"job_name: (\S+)\s+static_configs:\s+- targets: \[([^\]]*)\]", text)
        return {
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": json.loads(f"[{t}]")}]}
                for job, t in jobs
            ]
        }
    data = yaml.safe_load(text)
    assert isinstance(data, dict)
    return data


def test_prometheus_scrapes_every_service_on_its_port() -> None:
    config = _prometheus()
    targets = {
        job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
        for job in config["scrape_configs"]
    }
    assert set(targets) == {"fieldline-broker", "fieldline-ingest", "fieldline-edge"}
    assert targets["fieldline-broker"] == [f"127.0.0.1:{BrokerSettings().metrics_port}"]
    assert f"127.0.0.1:{IngestSettings().metrics_port}" in targets["fieldline-ingest"]
    assert targets["fieldline-edge"]
    ports = [int(t.rpartition(":")[2]) for ts in targets.values() for t in ts]
    assert len(ports) == len(set(ports)), "two jobs scrape the same port"


def test_the_dashboard_is_a_grafana_dashboard_on_a_prometheus_variable() -> None:
    data = json.loads((REPO / "deploy" / "grafana" / "fieldline.json").read_text())
    assert data["schemaVersion"] >= 39
    variables = {v["name"]: v for v in data["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = data["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("rows/s", "messages/s", "lag", "dead letters", "connect", "denials", "outbox"):
        assert topic in titles, topic
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]


# -- the CRL renewal timer ---------------------------------------------------------------------


def _commands(exec_line: str) -> list[list[str]]:
    """The argv of every command an Exec line runs, looking inside `/bin/sh -c '...'`."""
    argv = shlex.split(exec_line.lstrip("+-"))
    if argv[:2] != ["/bin/sh", "-c"]:
        return [argv]
    parts = re.split(r"&&|\|\||;", argv[2])
    return [shlex.split(part) for part in parts if part.strip()]


def _assert_real_fieldline_command(argv: list[str]) -> None:
    assert argv[0] == FIELDLINE, argv
    words = []
    for arg in argv[1:]:
        if arg.startswith("-"):
            break
        words.append(arg)
    result = runner.invoke(app, [*words, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, f"{words}: {result.output}"
    for flag in (a for a in argv if a.startswith("--")):
        assert flag in result.output, f"{flag} is not an option of {words}"


def test_crl_renewal_unit_renews_rerenders_mosquitto_and_checks_its_copy() -> None:
    unit = parse_unit(SYSTEMD / CRL_UNIT)
    assert one(unit, "Type") == "oneshot"
    assert one(unit, "User") == "fieldline"
    assert one(unit, "ReadWritePaths") == HOME
    assert one(unit, "NoNewPrivileges") == "yes"
    assert one(unit, "ProtectSystem") == "strict"
    assert f"FIELDLINE_HOME={HOME}" in values(unit, "Environment")
    commands = [c for line in values(unit, "ExecStart") for c in _commands(line)]
    fieldline = [c for c in commands if c[0] == FIELDLINE]
    for argv in fieldline:
        _assert_real_fieldline_command(argv)
    # 1. renew, only when a third of the validity remains, as the fieldline account
    renew = values(unit, "ExecStart")[0]
    assert shlex.split(renew) == [FIELDLINE, "certs", "crl", "renew", "--if-due"]
    # 2. as root ("+"): render Mosquitto's files again with the very command of its unit...
    step2 = values(unit, "ExecStart")[1]
    assert step2.startswith("+")
    mosquitto_text = (SYSTEMD / "fieldline-mosquitto.service").read_text()
    render = re.search(r"fieldline broker mosquitto-config (.*?)\n#\s*(.*?)\n", mosquitto_text)
    assert render is not None
    rendered = render[1].rstrip(" \\") + " " + render[2]
    expected = ["broker", "mosquitto-config", *shlex.split(rendered)]
    assert [FIELDLINE, *expected] in commands
    # ...reload it (its ExecReload is SIGHUP), and check the copy it reads now
    assert ["systemctl", "reload", "fieldline-mosquitto.service"] in commands
    assert "kill -HUP $MAINPID" in one(
        parse_unit(SYSTEMD / "fieldline-mosquitto.service"), "ExecReload"
    )
    out = expected[expected.index("--out") + 1]
    assert [FIELDLINE, "certs", "crl", "show", "--file", f"{out}/certs/crl.pem"] in commands
    assert commands.index(["systemctl", "reload", "fieldline-mosquitto.service"]) < commands.index(
        [FIELDLINE, "certs", "crl", "show", "--file", f"{out}/certs/crl.pem"]
    )
    # skipped, not failed, where Mosquitto does not run (the embedded broker reads the PKI's)
    assert commands[1] == ["systemctl", "is-active", "--quiet", "fieldline-mosquitto.service"]
    # the status goes to the journal first; "-": a stale CRL must not stop its renewal
    pre = one(unit, "ExecStartPre")
    assert pre.startswith("-")
    assert _commands(pre) == [[FIELDLINE, "certs", "crl", "show"]]
    # a oneshot started by its timer: no [Install] of its own
    assert "Install" not in unit


def test_crl_renewal_timer_runs_the_unit_daily_and_catches_up() -> None:
    timer = parse_unit(SYSTEMD / CRL_TIMER)
    assert one(timer, "Unit", "Timer") == CRL_UNIT
    assert (SYSTEMD / one(timer, "Unit", "Timer")).is_file()
    assert one(timer, "OnCalendar", "Timer") == "daily"
    assert one(timer, "Persistent", "Timer") == "true"  # a run missed while off happens at boot
    assert one(timer, "OnBootSec", "Timer")
    assert one(timer, "WantedBy", "Install") == "timers.target"
    # daily runs renew long before expiry: a third of the default validity is 10 days
    assert Settings().certs.crl_validity_days / 3 >= 7


# -- Prometheus alerting rules ---------------------------------------------------------------


def _exposed_sample_names() -> set[str]:
    """Every sample name the services' registries expose (as Prometheus scrapes them)."""
    from broker.metrics import BrokerMetrics
    from edge_agent.agent import AgentMetrics
    from ingest_worker.metrics import IngestMetrics

    names: set[str] = set()
    for registry in (BrokerMetrics().registry, IngestMetrics().registry, AgentMetrics().registry):
        for family in registry.collect():
            suffixes = {
                "counter": ("_total", "_created"),
                "histogram": ("_bucket", "_count", "_sum", "_created"),
                "summary": ("_count", "_sum", "_created"),
            }.get(family.type, ("",))
            names.update(family.name + suffix for suffix in suffixes)
    return names


def _alert_rules() -> list[dict[str, Any]]:
    import yaml

    data = yaml.safe_load((REPO / "deploy" / "prometheus" / "alerts.yml").read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def test_prometheus_loads_the_alert_rules() -> None:
    import yaml

    config = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
    # rule_files are relative to the configuration file
    assert [(REPO / "deploy" / f).resolve() for f in config["rule_files"]] == [
        REPO / "deploy" / "prometheus" / "alerts.yml"
    ]


def test_every_alert_is_complete_and_uses_real_metrics() -> None:
    rules = _alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    exposed = _exposed_sample_names()
    assert "fieldline_broker_crl_next_update_timestamp_seconds" in exposed
    assert "fieldline_broker_dropped_total" in exposed
    assert "fieldline_broker_dropped" not in exposed  # counters are scraped with _total
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert rule["annotations"]["description"], rule["alert"]
        expr = rule["expr"]
        assert expr.count("(") == expr.count(")"), rule["alert"]
        assert expr.count("[") == expr.count("]"), rule["alert"]
        if "for" in rule:
            assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
    # every metric the file names (expressions and the hints in descriptions) exists
    text = (REPO / "deploy" / "prometheus" / "alerts.yml").read_text()
    used = set(re.findall(r"\bfieldline_[a-z0-9_]+", text))
    assert used, "no metrics found"
    missing = used - exposed
    assert not missing, f"alerts.yml names metrics no service exposes: {sorted(missing)}"


def test_the_alerts_cover_what_the_issue_asked_for() -> None:
    exprs = {rule["alert"]: rule["expr"] for rule in _alert_rules()}

    def alerting_on(*metrics: str) -> list[str]:
        return [name for name, expr in exprs.items() if all(m in expr for m in metrics)]

    expiry = alerting_on("fieldline_broker_crl_next_update_timestamp_seconds")
    assert any("7 * 86400" in exprs[name] for name in expiry)
    assert alerting_on("fieldline_ingest_acks_pending", "fieldline_ingest_last_commit_timestamp")
    assert alerting_on("fieldline_ingest_dead_letters_total")
    assert alerting_on("fieldline_broker_dropped_total")
    assert alerting_on("fieldline_edge_outbox_depth")
    assert alerting_on(
        "fieldline_ingest_nats_stream_bytes", "fieldline_ingest_nats_stream_budget_bytes"
    )
    assert alerting_on("fieldline_ingest_nats_stranded_messages")
