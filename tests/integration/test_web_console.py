"""The web console in a real browser: Debian's headless Chromium driven by Playwright, against
PostgreSQL + TimescaleDB, the embedded broker, a real ingest worker, three simulated devices
(`fieldline sim fleet`) and the web server.

Before the fleet starts, each device publishes an hour of history as a telemetry backlog
(timestamped samples from the simulator's own models), so a chart has real buckets to compare
with SQL. Screenshots go to test-artifacts/screenshots/; with FIELDLINE_DOCS_SCREENSHOT=1 the
device page is also saved as docs/img/console.png (the README's picture).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from certs import Role
from ingest_worker.migrate import tenant_schema
from simulator.sources import SensorBank, make_source
from tests.fixtures.brokers import BrokerUnderTest, start_fieldline
from tests.fixtures.ingest import WorkerProcess, burst, count, fetch, fetchval, start_worker
from tests.fixtures.pki import build_test_pki
from tests.fixtures.postgres import PgServer
from tests.fixtures.prereq import missing, stop_process
from tests.fixtures.web import create_token, run_async, start_web

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SHOTS = REPO / "test-artifacts" / "screenshots"
DOCS_SHOT = REPO / "docs" / "img" / "console.png"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
TENANT = "acme"
DEVICES = ("press-0001", "press-0002", "press-0003")
HISTORY = timedelta(hours=1)
HISTORY_STEP_S = 5
SIM_SEED = 5
VIEWPORT = {"width": 1280, "height": 800}
SCHEMA = tenant_schema(TENANT)
WAIT_MS = 15_000  # Playwright's waits, in ms: generous on a loaded 2-core CI machine
# functions, not expressions: Playwright evaluates a bare expression with eval, which the
# console's Content-Security-Policy forbids
SPAN_IS = """ms => {
    const s = document.querySelector('[data-testid=chart-svg][data-metric=temperature]').dataset;
    return Date.parse(s.until) - Date.parse(s.since) === ms;
}"""


@dataclass
class Stack:
    url: str
    dsn: str
    operator: str
    viewer: str
    broker: BrokerUnderTest
    worker: WorkerProcess


def _first_live_values(seed: int) -> dict[str, dict[str, float]]:
    """The values `fieldline sim fleet --seed SEED` publishes first: its bank, rebuilt."""
    bank = SensorBank(seed)
    sources = {d: make_source("arma", bank, 2, interval_s=1.0) for d in DEVICES}
    bank.step()
    return {
        device: {k: v["v"] if isinstance(v, dict) else v for k, v in source.metrics(0).items()}
        for device, source in sources.items()
    }


def _history(seed: int, lands_on: dict[str, float]) -> bytes:
    """An hour of samples every 5 s from the simulator's default models, up to now; eased
    into `lands_on`, the device's first live values, so history and live data join up."""
    bank = SensorBank(seed)
    handles = {
        name: (bank.add(bank.model(name), interval_s=HISTORY_STEP_S), bank.model(name).unit)
        for name in ("temperature", "humidity")
    }
    end = datetime.now(UTC)
    steps = int(HISTORY.total_seconds() // HISTORY_STEP_S)
    series: dict[str, list[float]] = {name: [] for name in handles}
    for _ in range(steps):
        bank.step()
        for name, (handle, _unit) in handles.items():
            series[name].append(bank.value(handle) or 0.0)
    for name, values in series.items():
        shift = lands_on.get(name, values[-1]) - values[-1]
        series[name] = [round(v + shift * (i / steps) ** 2, 3) for i, v in enumerate(values, 1)]
    samples = []
    for i in range(steps):
        ts = end - timedelta(seconds=(steps - i) * HISTORY_STEP_S)
        metrics = {
            name: {"v": series[name][i], "u": unit} if unit else series[name][i]
            for name, (_handle, unit) in handles.items()
        }
        samples.append({"ts": int(ts.timestamp() * 1000), "metrics": metrics})
    return json.dumps({"samples": samples}).encode()


def _alert(minutes_ago: float) -> bytes:
    ts = datetime.now(UTC) - timedelta(minutes=minutes_ago)
    return json.dumps({
        "ts": int(ts.timestamp() * 1000), "kind": "threshold", "severity": "warning",
        "message": "temperature above 23.5 °C for 5 min",
        "data": {"metric": "temperature", "limit": 23.5},
    }).encode()  # fmt: skip


def _until(what: str, check: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


# Playwright's sync API keeps an event loop running in this thread: queries run in their own
def _value(dsn: str, sql: str, *args: Any) -> Any:
    return run_async(lambda: fetchval(dsn, sql, *args))


def _rows(dsn: str, sql: str, *args: Any) -> list[Any]:
    return run_async(lambda: fetch(dsn, sql, *args))


@pytest.fixture(scope="module")
def stack(pg_server: PgServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The whole pipeline plus the web server, once for the module."""
    if not CHROMIUM.exists():
        missing(f"{CHROMIUM} is not installed (make setup installs Debian's chromium)")
    if not pg_server.timescaledb:
        missing("TimescaleDB is not installed for this PostgreSQL (make setup builds it)")
    workdir = tmp_path_factory.mktemp("console")
    dsn = pg_server.new_database("console")
    # a PKI of its own: the devices and the server's `web-acme` are not the session's business
    own = build_test_pki(workdir / "pki")
    broker = start_fieldline(own, workdir / "broker")
    stoppers: list[Callable[[], object]] = [broker.stop]
    try:
        worker = start_worker(broker, dsn, workdir / "worker")
        stoppers.append(worker.stop)
        pki = own.pki
        first = _first_live_values(SIM_SEED)
        for n, device in enumerate(DEVICES):
            bundle = pki.issue(device, tenant=TENANT, role=Role.DEVICE)
            history = _history(seed=11 + n, lands_on=first[device])
            messages = [(f"fl/{TENANT}/{device}/telemetry", history)]
            if n == 1:
                messages.append((f"fl/{TENANT}/{device}/events", _alert(minutes_ago=12)))
            burst(broker, bundle, messages)
        per_device = 2 * int(HISTORY.total_seconds() // HISTORY_STEP_S)
        _until(
            "the history in the database",
            lambda: (
                run_async(lambda: count(dsn, f"{SCHEMA}.numeric_values"))
                >= per_device * len(DEVICES)
            ),
        )
        env = {
            **os.environ,
            "FIELDLINE_HOME": str(pki.root.parent),
            "FIELDLINE_LOG_LEVEL": "INFO",
        }
        sim_log = (workdir / "sim.log").open("wb")
        stoppers.append(sim_log.close)
        sim = subprocess.Popen(
            [sys.executable, "-m", "fieldline", "sim", "fleet", "--tenant", TENANT,
             "--devices", str(len(DEVICES)), "--prefix", "press", "--interval", "1",
             "--host", "127.0.0.1", "--port", str(broker.port), "--seed", str(SIM_SEED)],
            stdout=sim_log, stderr=sim_log, env=env, cwd=workdir,
        )  # fmt: skip
        stoppers.append(lambda: stop_process(sim))
        web = start_web(dsn, broker, workdir / "web")
        stoppers.append(web.stop)
        operator = create_token(dsn, TENANT, "operator", name="console-test")
        viewer = create_token(dsn, TENANT, "viewer", name="console-viewer")
        _until(
            "the simulated devices online, their birth (firmware) stored",
            lambda: (
                _value(
                    dsn,
                    f"SELECT count(*) FROM {SCHEMA}.devices "  # noqa: S608
                    "WHERE status = 'online' AND fw IS NOT NULL",
                )
                == len(DEVICES)
            ),
        )
        yield Stack(web.url, dsn, operator, viewer, broker, worker)
    finally:
        for stop in reversed(stoppers):
            stop()


@pytest.fixture(scope="module")
def browser(stack: Stack) -> Iterator[Any]:
    """Debian's Chromium, headless, a fresh profile (Playwright's own download needs internet)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("the playwright package is not installed (make setup installs the dev extras)")
        raise AssertionError("unreachable") from None

    profile = tempfile.mkdtemp(prefix="fl-chromium-")
    try:
        with sync_playwright() as playwright:
            context = playwright.chromium.launch_persistent_context(
                profile,
                executable_path=str(CHROMIUM),
                headless=True,
                args=CHROMIUM_ARGS,
                viewport=VIEWPORT,  # type: ignore[arg-type]
                locale="en-GB",
                timezone_id="UTC",
            )
            context.set_default_timeout(WAIT_MS)
            try:
                yield context
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def _shot(page: Any, name: str, *, full_page: bool = False) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / name), full_page=full_page)


def _login(browser: Any, stack: Stack, token: str, path: str = "#/") -> Any:
    """A new tab (its own sessionStorage), signed in with `token`, at `path`."""
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.errors = errors  # the tests end with `assert page.errors == []`
    page.goto(f"{stack.url}/#/login")
    page.get_by_label("API token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_test_id("whoami").wait_for()
    if path != "#/":
        page.goto(f"{stack.url}/{path}")
    return page


def test_a_bad_token_is_refused_with_the_servers_reason(browser: Any, stack: Stack) -> None:
    page = browser.new_page()
    page.goto(f"{stack.url}/")
    page.get_by_test_id("login-page").wait_for()  # no token yet: the login page
    error = page.get_by_test_id("login-error")
    # well-formed but unknown: the server says no (401), the page shows its sentence
    page.get_by_label("API token").fill("flt_0123456789ab_" + "A" * 43)
    page.get_by_role("button", name="Sign in").click()
    error.wait_for(state="visible")
    assert "token" in error.inner_text().lower()
    assert page.get_by_test_id("whoami").is_hidden()
    assert page.evaluate("sessionStorage.getItem('fieldline.token')") is None
    # not a token at all: said before anything is sent
    page.get_by_label("API token").fill("hunter2")
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_function(
        "() => document.querySelector('[data-testid=login-error]').textContent.includes('flt_')"
    )
    page.close()


def test_the_fleet_shows_every_device_online_and_search_filters(browser: Any, stack: Stack) -> None:
    page = _login(browser, stack, stack.operator)
    rows = page.get_by_test_id("device-row")
    page.wait_for_function(
        "n => document.querySelectorAll('[data-testid=device-row] [data-status=online]').length"
        " === n",
        arg=len(DEVICES),
    )
    assert sorted(rows.evaluate_all("rs => rs.map(r => r.dataset.device)")) == list(DEVICES)
    for row in rows.all():
        assert row.get_by_test_id("device-status").inner_text() == "online"
        assert re.fullmatch(r"\d+ s ago", row.get_by_test_id("device-last-seen").inner_text())
        assert "temperature" in row.inner_text()
    assert page.get_by_test_id("stat-online").inner_text().startswith(str(len(DEVICES)))
    assert page.get_by_test_id("role").text_content() == "operator"
    _shot(page, "fleet.png")

    page.get_by_test_id("fleet-search").fill("0002")
    page.wait_for_function(
        "() => document.querySelectorAll('[data-testid=device-row]').length === 1"
    )
    assert rows.first.get_attribute("data-device") == "press-0002"
    page.get_by_test_id("fleet-search").fill("nothing-like-this")
    page.get_by_test_id("fleet-empty").wait_for(state="visible")

    # the alerts page: the device's own warning, through the real pipeline
    page.get_by_test_id("nav-alerts").click()
    alert = page.get_by_test_id("alert-row")
    alert.first.wait_for()
    assert alert.count() == 1
    assert "press-0002" in alert.first.inner_text()
    assert "temperature above 23.5" in alert.first.inner_text()
    assert page.errors == []
    page.close()


def _chart(page: Any, metric: str) -> dict[str, Any]:
    """What the chart of `metric` drew: its scales and every point's data and position."""
    result: dict[str, Any] = page.eval_on_selector(
        f"[data-testid=chart-svg][data-metric={metric}]",
        """svg => ({
            scale: Object.fromEntries(['since', 'until', 'bucketS', 'xMin', 'xMax', 'yMin', 'yMax',
                'plotLeft', 'plotTop', 'plotWidth', 'plotHeight'].map(k => [k, svg.dataset[k]])),
            points: [...svg.querySelectorAll('[data-testid=chart-point]')].map(c => ({
                t: c.dataset.t, min: +c.dataset.min, avg: +c.dataset.avg, max: +c.dataset.max,
                count: +c.dataset.count, live: c.dataset.live === '1',
                cx: +c.getAttribute('cx'), cy: +c.getAttribute('cy'),
            })),
            line: svg.querySelector('path.line').getAttribute('d'),
        })""",
    )
    return result


def _buckets(dsn: str, device: str, metric: str, since: str, until: str, bucket_s: int) -> Any:
    """The same range in SQL: time_bucket from `since`, min/avg/max/count per bucket."""
    rows = _rows(
        dsn,
        f"SELECT time_bucket(make_interval(secs => $3), v.time, $4::timestamptz) AS t, "  # noqa: S608
        "min(v.value), avg(v.value), max(v.value), count(*) "
        f"FROM {SCHEMA}.numeric_values v JOIN {SCHEMA}.metrics m ON m.id = v.metric_id "
        "WHERE m.device_id = $1 AND m.name = $2 AND v.time >= $4 AND v.time < $5 "
        "GROUP BY 1 ORDER BY 1",
        device, metric, bucket_s, datetime.fromisoformat(since), datetime.fromisoformat(until),
    )  # fmt: skip
    return {r["t"]: (r["min"], r["avg"], r["max"], r["count"]) for r in rows}


def _check_chart(dsn: str, device: str, metric: str, drawn: dict[str, Any]) -> int:
    """Every fetched point equals its SQL bucket and is drawn where its value says; returns
    how many points were compared."""
    s = drawn["scale"]
    since, until, bucket_s = s["since"], s["until"], int(s["bucketS"])
    expected = _buckets(dsn, device, metric, since, until, bucket_s)
    until_t = datetime.fromisoformat(until)
    # a bucket that ends near `until` may have gained rows since the fetch (ingest latency)
    settled = until_t - timedelta(seconds=bucket_s + 5)
    compared = 0
    x_min, x_max = float(s["xMin"]), float(s["xMax"])
    y_min, y_max = float(s["yMin"]), float(s["yMax"])
    left, top = float(s["plotLeft"]), float(s["plotTop"])
    width, height = float(s["plotWidth"]), float(s["plotHeight"])
    for p in drawn["points"]:
        t = datetime.fromisoformat(p["t"])
        # drawn where the data says (to a pixel's hundredth: the attributes are rounded so)
        ms = t.timestamp() * 1000
        assert p["cx"] == pytest.approx(left + (ms - x_min) / (x_max - x_min) * width, abs=0.01)
        y = top + (1 - (p["avg"] - y_min) / (y_max - y_min)) * height
        assert p["cy"] == pytest.approx(y, abs=0.01), p
        assert p["min"] <= p["avg"] <= p["max"]
        if p["live"] or t >= settled:
            continue
        assert t in expected, f"{metric}: a point at {t} that SQL has no bucket for"
        lo, avg, hi, count = expected[t]
        assert (p["min"], p["max"], p["count"]) == (lo, hi, count), (p, expected[t])
        assert p["avg"] == pytest.approx(avg, rel=1e-12), (p, expected[t])
        compared += 1
    fetched = {datetime.fromisoformat(p["t"]) for p in drawn["points"] if not p["live"]}
    lost = [t for t in expected if t < settled and t not in fetched]
    assert not lost, f"{metric}: SQL buckets not drawn: {lost[:5]}"
    return compared


def test_a_device_chart_matches_the_database_and_updates_live(browser: Any, stack: Stack) -> None:
    device = DEVICES[0]
    page = _login(browser, stack, stack.viewer, f"#/devices/{device}")
    page.get_by_test_id("device-title").wait_for()
    for metric in ("temperature", "humidity"):
        page.wait_for_selector(f"[data-testid=chart-svg][data-metric={metric}][data-loaded='1']")
    # the default range, 1 h: the backlog fills it
    for metric in ("temperature", "humidity"):
        drawn = _chart(page, metric)
        assert _check_chart(stack.dsn, device, metric, drawn) >= 100, metric
        assert drawn["line"].startswith("M")
    assert page.locator("[data-metric=temperature] [data-testid=chart-unit]").text_content() == "°C"

    # points sized to the chart's width: one bucket per two pixels, as the contract rounds it
    page.get_by_test_id("range-15m").click()
    page.wait_for_function(SPAN_IS, arg=15 * 60_000)
    drawn = _chart(page, "temperature")
    wanted = max(2, int(float(drawn["scale"]["plotWidth"]) // 2))
    assert int(drawn["scale"]["bucketS"]) == math.ceil(900 / wanted)
    assert _check_chart(stack.dsn, device, "temperature", drawn) >= 50

    # live: the stream's values are appended as new or merged buckets, each a real value
    page.wait_for_selector("[data-metric=temperature] [data-testid=chart-point][data-live='1']")
    live = [p for p in _chart(page, "temperature")["points"] if p["live"]]
    bucket = timedelta(seconds=int(drawn["scale"]["bucketS"]))
    start = datetime.fromisoformat(live[-1]["t"])
    rows = _rows(
        stack.dsn,
        f"SELECT v.value FROM {SCHEMA}.numeric_values v JOIN {SCHEMA}.metrics m "  # noqa: S608
        "ON m.id = v.metric_id WHERE m.device_id = $1 AND m.name = 'temperature' "
        "AND v.time >= $2 AND v.time < $3",
        device, start, start + bucket,
    )  # fmt: skip
    values = {r["value"] for r in rows}
    assert live[-1]["min"] in values
    assert live[-1]["max"] in values

    # the hover readout names the bucket under the pointer
    box = page.locator("[data-testid=chart-svg][data-metric=temperature]").bounding_box()
    point = _chart(page, "temperature")["points"][len(drawn["points"]) // 2]
    page.mouse.move(box["x"] + point["cx"], box["y"] + point["cy"])
    readout = page.locator("[data-metric=temperature] [data-testid=chart-readout]")
    readout.wait_for(state="visible")
    assert readout.get_attribute("data-t") == point["t"]
    assert float(readout.get_attribute("data-avg") or "nan") == point["avg"]
    assert "°C" in readout.inner_text()

    # a viewer reads but cannot command: no command control at all
    page.get_by_test_id("readonly-note").wait_for()
    assert page.locator("[data-testid^=cmd-]").count() == 0
    assert page.get_by_test_id("command-panel").count() == 0
    assert page.get_by_test_id("role").text_content() == "viewer"
    page.mouse.move(0, 0)
    _shot(page, "device.png")
    assert page.errors == []
    page.close()


def test_set_interval_from_the_page_shows_the_devices_answer(browser: Any, stack: Stack) -> None:
    device = DEVICES[1]
    page = _login(browser, stack, stack.operator, f"#/devices/{device}")
    page.get_by_test_id("command-panel").wait_for()
    page.get_by_label("Interval").fill("2")
    page.get_by_test_id("cmd-set-interval").click()
    item = page.get_by_test_id("command-item").filter(has_text="set-interval").first
    status = item.get_by_test_id("command-status")
    status.wait_for()
    command_id = item.get_attribute("data-command-id")
    # the device answers over MQTT, the worker stores it, the stream brings it to the page
    page.wait_for_function(
        "id => document.querySelector(`[data-command-id='${id}'] [data-testid=command-status]`)"
        ".dataset.status === 'ok'",
        arg=command_id,
    )
    assert status.inner_text() == "ok"
    assert "2 s" in item.get_by_test_id("command-detail").inner_text()
    row = _rows(
        stack.dsn,
        f"SELECT name, args, status FROM {SCHEMA}.commands WHERE id = $1",  # noqa: S608
        command_id,
    )
    assert [(r["name"], json.loads(r["args"]), r["status"]) for r in row] == [
        ("set-interval", {"interval_s": 2}, "ok")
    ]
    # a mistake is the device's to report: an unknown command comes back `rejected`
    page.get_by_text("Other command").click()
    page.get_by_label("Name", exact=True).fill("self-destruct")
    page.get_by_test_id("cmd-custom-send").click()
    bad = page.get_by_test_id("command-item").filter(has_text="self-destruct").first
    page.wait_for_function(
        "() => [...document.querySelectorAll('[data-testid=command-item][data-name=self-destruct]"
        " [data-testid=command-status]')].some(s => s.dataset.status === 'rejected')"
    )
    assert bad.get_by_test_id("command-status").inner_text() == "rejected"
    # the answer stays: a late `sent` (the POST's own reply) never overwrites `ok`
    assert (
        page.locator(
            f"[data-command-id='{command_id}'] [data-testid=command-status]"
        ).get_attribute("data-status")
        == "ok"
    )
    _shot(page, "command.png", full_page=True)  # the sent list is below the fold
    # args that are not a JSON object never leave the page
    page.get_by_label("Arguments (JSON object)").fill("{not json")
    page.get_by_test_id("cmd-custom-send").click()
    page.wait_for_function(
        "() => document.querySelector('[data-testid=cmd-feedback]').dataset.kind === 'error'"
    )
    if os.environ.get("FIELDLINE_DOCS_SCREENSHOT") == "1":
        _docs_shot(page)
    assert page.errors == []
    page.close()


def _docs_shot(page: Any) -> None:
    """The README's picture: the device page with a readout under the pointer."""
    page.get_by_label("Arguments (JSON object)").fill("")
    page.get_by_text("Other command").click()  # closed again
    page.get_by_test_id("range-1h").click()
    page.wait_for_function(SPAN_IS, arg=60 * 60_000)
    page.evaluate("document.querySelector('[data-testid=cmd-feedback]').textContent = ''")
    svg = page.locator("[data-testid=chart-svg][data-metric=temperature]")
    box = svg.bounding_box()
    point = _chart(page, "temperature")["points"]
    target = point[int(len(point) * 0.62)]
    page.mouse.move(box["x"] + target["cx"], box["y"] + target["cy"])
    page.locator("[data-metric=temperature] [data-testid=chart-readout]").wait_for()
    DOCS_SHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(DOCS_SHOT))
