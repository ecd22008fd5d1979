"""The HTTP API against real servers: PostgreSQL + TimescaleDB, the embedded broker, an ingest
worker process and a device client answering commands. Tenant isolation, roles, bad input,
downsampling against SQL, a command's round trip (and its live event), revocation, bounds."""

from __future__ import annotations

import base64
import json
import math
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from core.settings import Settings
from fleet.db import on
from fleet.errors import NotFoundError
from fleet.series import recent_rows
from tests.fixtures.brokers import BrokerUnderTest, start_fieldline
from tests.fixtures.ingest import WorkerProcess, fetch, start_worker
from tests.fixtures.pki import TestPki, build_test_pki
from tests.fixtures.postgres import PgServer
from tests.fixtures.prereq import missing
from tests.fixtures.web import (
    WebHandle,
    create_token,
    revoke_token,
    run_async,
    seed_device,
    start_web,
)
from tests.metrics_text import samples
from web.errors import WebError
from web.server import WebServer

pytestmark = pytest.mark.integration

DAY = 86_400
NOW = datetime.now(UTC).replace(microsecond=0)


@dataclass
class Stack:
    pki: TestPki
    broker: BrokerUnderTest
    worker: WorkerProcess
    dsn: str
    web: WebHandle
    root: Path
    temp_id: int

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.web.url, headers=headers, timeout=30)

    def get(self, path: str, token: str | None, **params: Any) -> httpx.Response:
        with self.client(token) as c:
            return c.get(path, params=params)


class Device:
    """dev-1 of acme: answers every command on cmd-res with status ok (a paho client)."""

    def __init__(self, broker: BrokerUnderTest) -> None:
        bundle = broker.pki.device
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="dev-1",
                                  protocol=MQTTProtocolVersion.MQTTv311)  # fmt: skip
        self.client.tls_set(ca_certs=str(bundle.ca), certfile=str(bundle.cert),
                            keyfile=str(bundle.key))  # fmt: skip
        self.got: list[dict[str, Any]] = []
        self.subscribed = threading.Event()
        self.client.on_message = self._answer
        self.client.on_subscribe = lambda *_a: self.subscribed.set()
        self.client.on_connect = lambda c, *_a: c.subscribe("fl/acme/dev-1/cmd/#", qos=1)
        self.client.connect("127.0.0.1", broker.port, keepalive=30)
        self.client.loop_start()
        assert self.subscribed.wait(20), "the device did not subscribe"

    def _answer(self, client: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        body = json.loads(message.payload)
        self.got.append(body)
        answer = {"id": body["id"], "status": "ok", "detail": f"ran {body['name']}"}
        client.publish("fl/acme/dev-1/cmd-res", json.dumps(answer), qos=1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self.client.reinitialise()  # closes its socket pair now (paho#627)


@pytest.fixture(scope="module")
def stack(pg_server: PgServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if not pg_server.timescaledb:
        missing("TimescaleDB is not installed for this PostgreSQL (make setup builds it)")
    root = tmp_path_factory.mktemp("web")
    pki = build_test_pki(root)  # its own PKI: web-acme and the `web` server cert go there
    dsn = pg_server.new_database("web")
    # 24 h of a 1 Hz metric, the last row a second ago
    start = NOW - timedelta(seconds=DAY)
    rows = [(start + timedelta(seconds=i), 20 + 5 * math.sin(i / 3600) + (i % 7) * 0.1)
            for i in range(1, DAY + 1)]  # fmt: skip
    ids = seed_device(
        dsn, "acme", "dev-1", metrics={"temp": "numeric", "note": "text", "door": "bool"},
        units={"temp": "degC"}, values={"temp": rows, "door": [(NOW, 1.0)]},
        texts={"note": [(NOW, "hello")]},
    )  # fmt: skip
    seed_device(dsn, "acme", "dev-2", status="offline", metrics={"temp": "numeric"})
    seed_device(dsn, "globex", "dev-9", metrics={"temp": "numeric"}, values={"temp": [(NOW, 1)]})
    run_async(lambda: fetch(dsn, GLOBEX_SQL, GLOBEX_COMMAND))
    for kind, body in (("flood", HUGE_EVENT), ("threshold", {"message": "hot", "value": 81.5})):
        run_async(lambda k=kind, b=body: fetch(dsn, EVENT_SQL, NOW, k, json.dumps(b)))  # type: ignore[misc]
    broker = start_fieldline(pki, root / "broker")
    worker = start_worker(broker, dsn, root / "worker")
    web = start_web(dsn, broker, root / "web", tenants=("acme",), rate_per_s=5, rate_burst=30)
    try:
        yield Stack(pki, broker, worker, dsn, web, root, ids["temp"])
    finally:
        web.stop()
        worker.stop()
        broker.stop()


GLOBEX_COMMAND = str(uuid.uuid4())


# a hostile device's event: a whole payload of data (the ingest worker takes up to 256 KiB)
HUGE_EVENT = {"message": "m" * 1024, "data": {"pad": "x" * 200_000}}
EVENT_SQL = (
    'INSERT INTO "tenant_acme".events (time, device_id, kind, severity, body) '
    "VALUES ($1, 'dev-1', $2, 'warning', $3::jsonb)"
)

GLOBEX_SQL = (
    'INSERT INTO "tenant_globex".commands (id, device_id, name, status) '
    "VALUES ($1::uuid, 'dev-9', 'reset', 'ok')"
)


@pytest.fixture(scope="module")
def viewer(stack: Stack) -> str:
    return create_token(stack.dsn, "acme", "viewer", "acme viewer")


@pytest.fixture(scope="module")
def operator(stack: Stack) -> str:
    return create_token(stack.dsn, "acme", "operator", "acme operator")


@pytest.fixture(scope="module")
def admin(stack: Stack) -> str:
    return create_token(stack.dsn, None, "admin", "root")


def error(response: httpx.Response) -> str:
    body = response.json()
    assert set(body) == {"error"}, body
    return str(body["error"])


# -- auth, isolation, roles ------------------------------------------------------------------
def test_health_is_open_everything_else_needs_a_token(stack: Stack, viewer: str) -> None:
    health = stack.get("/api/v1/health", None)
    assert health.status_code == 200
    assert health.json()["database"] == "ok"
    assert "script-src 'self'" in health.headers["content-security-policy"]
    assert health.headers["x-content-type-options"] == "nosniff"
    assert health.headers["referrer-policy"] == "no-referrer"
    assert stack.get("/api/v1/whoami", None).status_code == 401
    forged = viewer[:-4] + ("AAAA" if not viewer.endswith("AAAA") else "BBBB")
    assert "unknown" in error(stack.get("/api/v1/whoami", forged))
    me = stack.get("/api/v1/whoami", viewer).json()
    assert (me["tenant"], me["role"], me["name"]) == ("acme", "viewer", "acme viewer")


def test_a_tenant_sees_only_its_own(stack: Stack, viewer: str, admin: str) -> None:
    assert stack.get("/api/v1/tenants", viewer).json() == {"tenants": ["acme"]}
    assert stack.get("/api/v1/tenants", admin).json() == {"tenants": ["acme", "globex"]}
    listed = stack.get("/api/v1/tenants/acme/devices", viewer).json()["devices"]
    assert [d["id"] for d in listed] == ["dev-1", "dev-2"]
    dev1 = listed[0]
    assert dev1["status"] == "online"
    assert dev1["metrics"] == ["door", "note", "temp"]
    assert set(dev1["latest"]) == {"door", "temp"}  # numeric only
    assert (
        stack.get("/api/v1/tenants/acme/devices", viewer, search="v-2").json()["devices"][0]["id"]
        == "dev-2"
    )
    for path in (
        "/api/v1/tenants/globex/devices",
        "/api/v1/tenants/globex/devices/dev-9",
        "/api/v1/tenants/globex/devices/dev-9/metrics/temp",
        f"/api/v1/tenants/globex/commands/{GLOBEX_COMMAND}",
        "/api/v1/tenants/acme/devices/dev-9",
        f"/api/v1/tenants/acme/commands/{GLOBEX_COMMAND}",
        "/api/v1/tenants/globex/alerts",
    ):
        response = stack.get(path, viewer)
        assert response.status_code == 404, (path, response.text)
        assert "dev-9" not in error(response) or "no such device" in error(response)
    # the admin sees globex's
    assert (
        stack.get(f"/api/v1/tenants/globex/commands/{GLOBEX_COMMAND}", admin).json()["status"]
        == "ok"
    )
    # a tenant that has sent nothing has no schema: a 404 saying so, for the API and for the
    # read functions (`fieldline up`'s live view once died on the function's missing schema)
    for path in ("/api/v1/tenants/initech/devices", "/api/v1/tenants/initech/alerts"):
        response = stack.get(path, admin)
        assert response.status_code == 404, (path, response.text)
        assert "has no data yet" in error(response)
    with pytest.raises(NotFoundError, match="has no data yet"):
        run_async(lambda: on(stack.dsn, lambda c: recent_rows(c, "initech", 60)))
    detail = stack.get("/api/v1/tenants/acme/devices/dev-1", viewer).json()
    kinds = {m["name"]: (m["kind"], m["unit"]) for m in detail["metric_info"]}
    assert kinds == {"door": ("bool", None), "note": ("text", None), "temp": ("numeric", "degC")}


def test_roles(stack: Stack, viewer: str, admin: str) -> None:
    body = {"name": "reset", "args": {}}
    with stack.client(viewer) as c:
        refused = c.post("/api/v1/tenants/acme/devices/dev-1/commands", json=body)
    assert refused.status_code == 403
    assert "operator" in error(refused)
    refused = stack.get("/api/v1/dead-letters", viewer)
    assert refused.status_code == 403
    assert error(refused) == "reading dead letters needs an admin token; this one is a viewer's"
    payload = b"x" * 3000
    run_async(lambda: fetch(
        stack.dsn, "INSERT INTO fieldline.dead_letters (topic, payload, reason, error, tenant_id) "
        "VALUES ('fl/acme/dev-1/telemetry', $1, 'bad_json', 'not JSON', 'acme')", payload,
    ))  # fmt: skip
    letters = stack.get("/api/v1/dead-letters", admin).json()["dead_letters"]
    assert letters[0]["reason"] == "bad_json"
    assert base64.b64decode(letters[0]["payload_b64"]) == payload[:1024]


def test_bad_input_is_a_4xx_that_says_what_was_wrong(stack: Stack, operator: str) -> None:
    base = "/api/v1/tenants/acme/devices/dev-1"
    cases: list[tuple[str, dict[str, Any], int, str]] = [
        (f"{base}/metrics/temp", {"since": "yesterday"}, 400, "since"),
        (f"{base}/metrics/temp", {"since": "1h", "until": "2h"}, 400, "before"),
        (f"{base}/metrics/temp", {"points": 0}, 400, "points"),
        (f"{base}/metrics/temp", {"points": 10001}, 400, "points"),
        (f"{base}/metrics/temp", {"points": "many"}, 422, "points"),
        (f"{base}/metrics/pressure", {}, 404, "it has: door, note, temp"),
        (f"{base}/metrics/note", {}, 400, "text"),
        (f"{base}/events", {"limit": 5000}, 400, "limit"),
        # found by the red team: these were 500s (OverflowError) or 503s (the database refused)
        (f"{base}/metrics/temp", {"since": "99999999999d"}, 400, "longer than 36500d"),
        (f"{base}/metrics/temp", {"since": "9" * 400 + "d"}, 400, "longer than 36500d"),
        (f"{base}/metrics/temp", {"since": "0001-01-01T00:00:00+14:00"}, 400, "years 1 to 9999"),
        (f"{base}/events", {"since": "1000000d"}, 400, "longer than 36500d"),
        ("/api/v1/tenants/acme/devices", {"search": "dev\x00"}, 400, "search"),
        ("/api/v1/tenants/ACME!/devices", {}, 404, "tenant"),
        ("/api/v1/nothing-here", {}, 404, "route"),
    ]
    for path, params, status, word in cases:
        response = stack.get(path, operator, **params)
        assert response.status_code == status, (path, params, response.text)
        assert word in error(response), (path, params, error(response))
    with stack.client(operator) as c:
        url = f"{base}/commands"
        malformed = c.post(url, content=b"{not json", headers={"content-type": "application/json"})
        assert malformed.status_code == 422
        assert "JSON" in error(malformed)
        huge = c.post(url, json={"name": "reset", "args": {"pad": "x" * 70_000}})
        assert huge.status_code == 413
        assert "max_body_bytes" in error(huge)
        # chunked, no Content-Length: counted as it arrives
        parts = iter([b'{"name": "reset", "args": {"pad": "', b"x" * 70_000, b'"}}'])
        chunked = c.post(url, content=parts, headers={"content-type": "application/json"})
        assert chunked.status_code == 413
        bad_name = c.post(url, json={"name": "Bad Name!"})
        assert bad_name.status_code == 400
        assert "name" in error(bad_name)
        extra = c.post(url, json={"name": "reset", "colour": "red"})
        assert extra.status_code == 422
        assert "colour" in error(extra)
        bad_ttl = c.post(url, json={"name": "reset", "ttl_s": 0})
        assert bad_ttl.status_code == 422
        assert "ttl_s" in error(bad_ttl)
        surrogate = c.post(url, content=b'{"name": "reset", "args": {"a": "\\ud800"}}',
                           headers={"content-type": "application/json"})  # fmt: skip
        assert surrogate.status_code == 400, surrogate.text
        assert "Unicode" in error(surrogate)


SET_INTERVAL = {"name": "set-interval", "args": {"interval_s": 5}, "ttl_s": 30}


# -- data ---------------------------------------------------------------------------------------
def test_24h_of_1hz_is_at_most_500_buckets_equal_to_sql(stack: Stack, viewer: str) -> None:
    since, until = NOW - timedelta(seconds=DAY), NOW + timedelta(seconds=1)
    response = stack.get("/api/v1/tenants/acme/devices/dev-1/metrics/temp", viewer,
                         since=since.isoformat(), until=until.isoformat(), points=500)  # fmt: skip
    assert response.status_code == 200, response.text
    body = response.json()
    step = body["bucket_s"]
    assert step == math.ceil((until - since).total_seconds() / 500) == 173
    points = body["points"]
    assert 0 < len(points) <= 500
    # computed here without time_bucket: bucket k covers [since + k*step, since + (k+1)*step)
    expected = run_async(lambda: fetch(
        stack.dsn,
        "SELECT floor(extract(epoch FROM time - $1) / $3)::int AS k, min(value), avg(value), "
        'max(value), count(*) FROM "tenant_acme".numeric_values WHERE metric_id = $4 '
        "AND time >= $1 AND time < $2 GROUP BY 1 ORDER BY 1",
        since, until, step, stack.temp_id,
    ))  # fmt: skip
    assert len(points) == len(expected)
    assert sum(p["count"] for p in points) == DAY
    for point, row in zip(points, expected, strict=True):
        assert datetime.fromisoformat(point["t"]) == since + timedelta(seconds=row["k"] * step)
        assert point["count"] == row["count"]
        assert point["min"] == row["min"]
        assert point["max"] == row["max"]
        assert point["avg"] == pytest.approx(row["avg"], rel=1e-12)
    latest = stack.get("/api/v1/tenants/acme/devices/dev-1", viewer).json()["latest"]["temp"]
    assert latest["value"] == pytest.approx(20 + 5 * math.sin(DAY / 3600) + (DAY % 7) * 0.1)


def test_a_command_reaches_the_device_and_its_result_comes_back(
    stack: Stack, operator: str, admin: str
) -> None:
    device = Device(stack.broker)
    events: list[tuple[str, Any]] = []
    opened = threading.Event()
    done = threading.Event()

    def listen() -> None:
        with (
            stack.client(operator) as c,
            c.stream("GET", "/api/v1/tenants/acme/stream", params={"device": "dev-1"}) as response,
        ):
            assert response.status_code == 200
            name = None
            for line in response.iter_lines():
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    events.append((str(name), json.loads(line[6:])))
                    opened.set()
                    if name == "command" and events[-1][1]["status"] == "ok":
                        done.set()
                        return

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    try:
        assert opened.wait(20), "the stream sent nothing"
        assert events[0][0] == "devices"
        with stack.client(operator) as c:
            sent = c.post("/api/v1/tenants/acme/devices/dev-1/commands",
                          json=SET_INTERVAL)  # fmt: skip
        assert sent.status_code == 202, sent.text
        command = sent.json()
        assert (command["status"], command["name"], command["args"]) == (
            "sent", "set-interval", {"interval_s": 5},
        )  # fmt: skip
        assert "warning" not in command
        deadline = time.monotonic() + 30
        while True:
            got = stack.get(f"/api/v1/tenants/acme/commands/{command['id']}", operator).json()
            if got["status"] == "ok":
                break
            assert time.monotonic() < deadline, f"no result: {got}"
            time.sleep(0.1)
        assert got["result"] == {"status": "ok", "detail": "ran set-interval"}
        assert device.got[0]["args"] == {"interval_s": 5}
        assert device.got[0]["ttl_s"] == 30
        listed = stack.get("/api/v1/tenants/acme/devices/dev-1/commands", operator).json()
        assert listed["commands"][0]["id"] == command["id"]
        assert done.wait(20), f"no command event in the stream: {events}"
        assert any(e[0] == "values" and "temp" in e[1]["values"] for e in events)
        offline = stack.get("/api/v1/tenants/acme/devices/dev-2", operator).json()
        assert offline["status"] == "offline"
        with stack.client(operator) as c:
            queued = c.post("/api/v1/tenants/acme/devices/dev-2/commands", json={"name": "reset"})
            assert queued.status_code == 202
            assert "offline" in queued.json()["warning"]
            unknown = c.post("/api/v1/tenants/acme/devices/dev-404/commands",
                             json={"name": "reset"})  # fmt: skip
            assert unknown.status_code == 404
        with stack.client(admin) as c:  # no web-globex certificate was issued
            no_cert = c.post(
                "/api/v1/tenants/globex/devices/dev-9/commands", json={"name": "reset"}
            )
        assert no_cert.status_code == 503
        assert "fieldline certs issue web-globex --tenant globex --role operator" in error(no_cert)
    finally:
        device.close()
        listener.join(1)


# -- bounds and revocation ------------------------------------------------------------------
def test_a_revoked_token_is_refused(stack: Stack) -> None:
    token = create_token(stack.dsn, "acme", "viewer", "short-lived")
    assert stack.get("/api/v1/whoami", token).status_code == 200
    revoke_token(stack.dsn, token)
    assert stack.get("/api/v1/whoami", token).status_code == 401


def test_a_token_past_its_rate_gets_429(stack: Stack) -> None:
    token = create_token(stack.dsn, "acme", "viewer", "busy")
    with stack.client(token) as c:
        codes = [c.get("/api/v1/whoami").status_code for _ in range(40)]
        assert codes[:25] == [200] * 25
        assert 429 in codes
        last = c.get("/api/v1/whoami")
        assert last.status_code == 429
        assert "rate_per_s" in error(last)
        assert int(last.headers["retry-after"]) >= 1
    metrics = samples(httpx.get(f"{stack.web.url}/metrics", timeout=10).text)
    assert metrics['fieldline_web_refused_total{reason="rate_limited"}'] >= 1


def test_failed_token_checks_are_bounded_per_address(stack: Stack, viewer: str) -> None:
    web = start_web(stack.dsn, None, stack.root / "web-guess", auth_failures_per_min=3)
    try:
        made_up = viewer[:-4] + ("AAAA" if not viewer.endswith("AAAA") else "BBBB")
        headers = {"Authorization": f"Bearer {made_up}"}
        codes = [
            httpx.get(f"{web.url}/api/v1/whoami", headers=headers, timeout=10).status_code
            for _ in range(5)
        ]
        assert codes == [401, 401, 401, 429, 429]
        # the address is out of checks: a valid token waits too, and health stays open
        valid = {"Authorization": f"Bearer {viewer}"}
        blocked = httpx.get(f"{web.url}/api/v1/whoami", headers=valid, timeout=10)
        assert blocked.status_code == 429
        assert "auth_failures_per_min" in error(blocked)
        assert int(blocked.headers["retry-after"]) >= 1
        assert httpx.get(f"{web.url}/api/v1/health", timeout=10).status_code == 200
        metrics = samples(httpx.get(f"{web.url}/metrics", timeout=10).text)
        assert metrics['fieldline_web_refused_total{reason="auth_failures"}'] == 3
    finally:
        web.stop()
    # each server keeps its own count: the shared one still answers this address
    assert stack.get("/api/v1/whoami", viewer).status_code == 200


def test_live_streams_are_bounded_per_token(stack: Stack) -> None:
    token = create_token(stack.dsn, "acme", "viewer", "streamer")
    with ExitStack() as held, stack.client(token) as c:
        for _ in range(4):
            response = held.enter_context(c.stream("GET", "/api/v1/tenants/acme/stream"))
            assert response.status_code == 200
        # a stream: headers come at once, so a missing bound fails here rather than hangs
        fifth = held.enter_context(c.stream("GET", "/api/v1/tenants/acme/stream"))
        assert fifth.status_code == 429
        fifth.read()
        assert "max_streams_per_token" in error(fifth)


# -- serving ----------------------------------------------------------------------------------
def test_console_and_docs_are_served_without_a_cdn(stack: Stack) -> None:
    with stack.client() as c:
        index = c.get("/")
        assert index.status_code == 200
        assert "text/html" in index.headers["content-type"]
        docs = c.get("/docs")
        assert "/docs/assets/swagger-ui-bundle.js" in docs.text
        assert "http" not in docs.text
        assert c.get("/docs/assets/swagger-ui-bundle.js").status_code == 200
        assert c.get("/docs/init.js").status_code == 200
        spec = c.get("/openapi.json").json()
        assert "/api/v1/tenants/{tenant}/devices/{device}/metrics/{metric}" in spec["paths"]


def test_https_beyond_loopback_needs_a_server_certificate(stack: Stack) -> None:
    home = stack.pki.pki.root.parent
    settings = Settings(home=home, database_url=stack.dsn, web={"host": "0.0.0.0", "port": 0})  # noqa: S104
    with pytest.raises(WebError, match=r"fieldline certs server web --ip 0\.0\.0\.0"):
        WebServer(settings)
    stack.pki.pki.issue_server("web", hosts=["localhost"], ips=["127.0.0.1"])
    web = start_web(stack.dsn, stack.broker, stack.root / "web-tls", https="always")
    try:
        assert web.url.startswith("https://127.0.0.1:")
        context = ssl.create_default_context(cafile=str(stack.pki.pki.ca_cert_path))
        assert httpx.get(f"{web.url}/api/v1/health", verify=context).status_code == 200
        with pytest.raises(httpx.HTTPError):
            httpx.get(web.url.replace("https", "http") + "/api/v1/health", timeout=5)
    finally:
        web.stop()


# -- found by the red team ---------------------------------------------------------------------
def test_a_huge_event_body_is_cut_before_it_travels(stack: Stack, viewer: str) -> None:
    for path in ("/api/v1/tenants/acme/devices/dev-1/events", "/api/v1/tenants/acme/alerts"):
        found = {e["kind"]: e for e in stack.get(path, viewer).json()["events"]}
        cut = found["flood"]["body"]
        assert cut == {"truncated": True, "bytes": cut["bytes"], "message": "m" * 1024}, path
        assert cut["bytes"] > 200_000
        assert found["threshold"]["body"] == {"message": "hot", "value": 81.5}  # small: whole
    metrics = samples(httpx.get(f"{stack.web.url}/metrics", timeout=10).text)
    assert metrics['fieldline_web_truncated_total{what="event_body"}'] >= 2


def test_slow_clients_cannot_hold_a_connection(stack: Stack, viewer: str) -> None:
    web = start_web(stack.dsn, None, stack.root / "web-slow", read_timeout_s=1, stream_ping_s=0.35)
    port = int(web.url.rsplit(":", 1)[1])
    try:
        # headers that never end (slowloris), and a body that never ends, before any token
        headers = socket.create_connection(("127.0.0.1", port), timeout=20)
        headers.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nX-Slow: 1")
        body = socket.create_connection(("127.0.0.1", port), timeout=20)
        body.sendall(b"POST /api/v1/tenants/acme/devices/dev-1/commands HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")  # fmt: skip
        with headers, body:
            assert headers.recv(100) == b"", "the server kept a connection without headers"
            answer = b""
            while chunk := body.recv(4096):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert b"web.read_timeout_s" in answer
        # a live stream is a long answer, not a slow request: it outlives the timeout
        pings = 0
        with (
            httpx.Client(base_url=web.url, headers={"Authorization": f"Bearer {viewer}"}) as c,
            c.stream("GET", "/api/v1/tenants/acme/stream", timeout=20) as stream,
        ):
            assert stream.status_code == 200
            for line in stream.iter_lines():
                pings += line == "event: ping"
                if pings == 4:  # 1.4 s: longer than web.read_timeout_s
                    break
        metrics = samples(httpx.get(f"{web.url}/metrics", timeout=10).text)
        assert metrics['fieldline_web_refused_total{reason="slow_request"}'] == 2
    finally:
        web.stop()
