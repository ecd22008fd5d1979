"""The web server's pure parts: token format and hash, bucket choice, durations and times,
the rate limiter, stream slots, loopback and the HTTPS rule."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from certs import Pki, Role
from core.settings import Settings
from fleet.durations import bucket_seconds, parse_duration, parse_time, time_range
from fleet.errors import BadInputError
from web.app import create_app
from web.errors import WebError
from web.limits import MAX_KEYS, RateLimiter, StreamSlots
from web.metrics import WebMetrics
from web.middleware import BodyLimit
from web.server import is_loopback, tls_files
from web.tokens import TokenRole, new_secret, parse, token_hash

NOW = datetime(2026, 12, 5, 7, 30, tzinfo=UTC)


def test_a_token_is_flt_id_secret_and_only_its_hash_is_kept() -> None:
    token_id, text = new_secret()
    prefix, rest = text[:4], text[4:]
    assert prefix == "flt_"
    assert rest[:12] == token_id
    assert len(token_id) == 12
    assert int(token_id, 16) >= 0
    assert rest[12] == "_"
    assert len(rest[13:]) == 43
    assert parse(text) == token_id
    assert token_hash(text) == hashlib.sha256(text.encode()).digest()
    assert new_secret()[1] != text
    for bad in ("", text[:-1], text + "x", text.replace("flt_", "flx_"), "Bearer " + text,
                f"flt_{token_id.upper()}_{text[17:]}", text[:-1] + "!"):  # fmt: skip
        assert parse(bad) is None, bad


def test_roles_are_ordered() -> None:
    assert TokenRole.ADMIN.at_least(TokenRole.OPERATOR)
    assert TokenRole.OPERATOR.at_least(TokenRole.VIEWER)
    assert not TokenRole.VIEWER.at_least(TokenRole.OPERATOR)
    assert not TokenRole.OPERATOR.at_least(TokenRole.ADMIN)


@pytest.mark.parametrize(
    ("span_s", "points", "bucket"),
    [(86_400, 500, 173), (86_400, 5000, 18), (3600, 500, 8), (60, 500, 1), (1000, 10, 100),
     (86_401, 500, 173), (86_500, 500, 173), (86_501, 500, 174), (0.5, 2, 1)],
)  # fmt: skip
def test_the_bucket_is_the_smallest_whole_second_giving_at_most_points(
    span_s: float, points: int, bucket: int
) -> None:
    start = NOW - timedelta(seconds=span_s)
    assert bucket_seconds(start, NOW, points) == bucket
    assert span_s / bucket <= points  # so at most `points` buckets counted from start
    if bucket > 1:
        assert span_s / (bucket - 1) > points  # and no smaller whole second would do


def test_durations_and_times() -> None:
    assert parse_duration("15m") == timedelta(minutes=15)
    assert parse_duration("7d") == timedelta(days=7)
    for bad in ("", "1", "-1h", "0m", "1w", "1 h", "yesterday"):
        with pytest.raises(BadInputError, match="duration"):
            parse_duration(bad)
    assert parse_time("24h", NOW) == NOW - timedelta(hours=24)
    assert parse_time("2026-12-05T06:30:00+00:00", NOW) == NOW - timedelta(hours=1)
    assert parse_time("2026-12-05T06:30:00", NOW) == NOW - timedelta(hours=1)  # UTC when bare
    with pytest.raises(BadInputError, match="since 'soon' is neither"):
        parse_time("soon", NOW, "since")
    assert time_range("1h", None, NOW) == (NOW - timedelta(hours=1), NOW)
    with pytest.raises(BadInputError, match="must be before"):
        time_range("1h", "2h", NOW)


def test_the_rate_limiter_is_a_token_bucket_per_key() -> None:
    clock = [0.0]
    limiter = RateLimiter(rate_per_s=2, burst=3, clock=lambda: clock[0])
    assert [limiter.allow("a") for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("b")  # another token has its own bucket
    assert limiter.retry_after("a") == pytest.approx(0.5)
    clock[0] = 0.5
    assert limiter.allow("a")
    assert not limiter.allow("a")
    clock[0] = 100.0
    assert [limiter.allow("a") for _ in range(4)] == [True, True, True, False]  # capped at burst


def test_holds_looks_without_taking_and_retry_after_counts_the_refill() -> None:
    clock = [0.0]
    limiter = RateLimiter(rate_per_s=0.5, burst=2, clock=lambda: clock[0])
    assert limiter.holds("a")  # an unknown key starts full
    assert [limiter.allow("a") for _ in range(3)] == [True, True, False]
    assert not limiter.holds("a")
    clock[0] = 1.0
    assert limiter.retry_after("a") == pytest.approx(1.0)  # half refilled already
    assert not limiter.holds("a")
    clock[0] = 2.0
    assert limiter.holds("a")
    assert limiter.holds("a")  # looking takes nothing
    assert limiter.allow("a")
    assert not limiter.holds("a")


def test_the_limiter_keeps_at_most_max_keys_even_when_none_is_idle() -> None:
    clock = [0.0]
    limiter = RateLimiter(rate_per_s=0.001, burst=1, clock=lambda: clock[0])
    for n in range(MAX_KEYS + 50):  # one failure per address, none refilled
        assert limiter.allow(f"10.0.{n // 256}.{n % 256}")
    assert not limiter.holds(f"10.0.{(MAX_KEYS + 49) // 256}.{(MAX_KEYS + 49) % 256}")
    assert limiter.holds("10.0.0.0")  # the oldest was forgotten: it starts over
    assert len(limiter) == MAX_KEYS


def test_stream_slots_are_bounded_per_key_and_given_back() -> None:
    slots = StreamSlots(per_key=2)
    assert slots.acquire("a")
    assert slots.acquire("a")
    assert not slots.acquire("a")
    assert slots.acquire("b")
    assert slots.total() == 3
    slots.release("a")
    assert slots.acquire("a")
    for key in ("a", "a", "b"):
        slots.release(key)
    assert slots.total() == 0


def test_plain_http_only_on_loopback(tmp_path: Path) -> None:
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "192.168.1.5", "::", "example.com"):  # noqa: S104
        assert not is_loopback(host), host
    settings = Settings(home=tmp_path)
    assert tls_files(settings, "127.0.0.1") is None
    with pytest.raises(WebError, match=r"fieldline certs server web --host fleet\.example\.com"):
        tls_files(settings, "fleet.example.com")
    always = Settings(home=tmp_path, web={"https": "always"})
    with pytest.raises(WebError, match=r"web\.https=always"):
        tls_files(always, "127.0.0.1")


# -- found by the red team (docs/web.md, Limits) -----------------------------------------------
def test_durations_and_times_beyond_the_calendar_are_bad_input_not_a_crash() -> None:
    for text in ("99999999999d", "9" * 400 + "d", "36501d"):
        with pytest.raises(BadInputError, match="longer than 36500d"):
            parse_duration(text)
    assert parse_duration("36500d") == timedelta(days=36_500)
    with pytest.raises(BadInputError, match="outside years 1 to 9999"):
        parse_time("0001-01-01T00:00:00+14:00", NOW, "since")
    with pytest.raises(BadInputError, match=r"until .* outside years 1 to 9999"):
        time_range("1h", "9999-12-31T23:59:59-14:00", NOW)
    # an offset is kept as the same instant, in UTC
    assert parse_time("2026-12-05T09:30:00+02:00", NOW).utcoffset() == timedelta(0)


def test_the_https_certificate_is_a_server_one_never_a_client_of_the_same_name(
    tmp_path: Path,
) -> None:
    settings = Settings(home=tmp_path)
    pki = Pki(settings.pki_dir)
    pki.init_ca(name="test CA")
    pki.issue("web", tenant="acme", role=Role.DEVICE)  # a device that happens to be called web
    with pytest.raises(WebError, match="no server certificate 'web'"):
        tls_files(settings, "0.0.0.0")  # noqa: S104
    server = pki.issue_server("web", hosts=["fleet.example.com"], force=True)
    assert tls_files(settings, "0.0.0.0") == (server.cert, server.key)  # noqa: S104


def test_an_unexpected_error_is_a_json_500_without_internals(tmp_path: Path) -> None:
    app = create_app(Settings(home=tmp_path), dsn="postgresql://127.0.0.1:1/none")

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret internals: SELECT * FROM fieldline.api_tokens")

    async def get() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.get("/boom")

    response = asyncio.run(get())
    assert response.status_code == 500
    assert set(response.json()) == {"error"}
    assert "secret" not in response.text
    assert "SELECT" not in response.text
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "script-src 'self'" in response.headers["content-security-policy"]


def test_a_body_that_does_not_arrive_in_time_is_a_408() -> None:
    metrics = WebMetrics()
    reached: list[bool] = []

    async def app(_scope: Any, _receive: Any, _send: Any) -> None:
        reached.append(True)

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(3600)  # a client sending nothing more
        raise AssertionError

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "headers": [(b"content-length", b"10")]}
    limit = BodyLimit(app, limit=1024, metrics=metrics, timeout_s=0.05)
    asyncio.run(asyncio.wait_for(limit(scope, receive, send), 10))
    assert not reached
    assert sent[0]["status"] == 408
    assert b"web.read_timeout_s" in sent[1]["body"]
    refused = metrics.registry.get_sample_value(
        "fieldline_web_refused_total", {"reason": "slow_request"}
    )
    assert refused == 1
