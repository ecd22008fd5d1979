"""The CRL's life cycle against the real brokers: a stale CRL refuses everyone and says so once,
`fieldline certs crl` reports it with its exit status, renewal (by hand, by the embedded
broker itself, by `fieldline up`'s loop for Mosquitto) brings clients back and keeps every
revoked serial revoked.

Each test builds a PKI of its own: they rewrite its CRL.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from certs import Pki, Renewer, read_crl
from fieldline.stack import reload_mosquitto
from tests.fixtures.brokers import (
    BrokerUnderTest,
    _mosquitto_options,
    start_fieldline,
    start_rendered_mosquitto,
)
from tests.fixtures.pki import TestPki, build_test_pki
from tests.mqtt_raw import RawClient

pytestmark = pytest.mark.integration

DAY_S = 86400


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def wait_past(moment: datetime | None) -> None:
    assert moment is not None
    wait_until(lambda: datetime.now(UTC) > moment, 30, f"{moment}")


def connects(broker: BrokerUnderTest, who: str) -> bool:
    """True on CONNACK 0. A refused certificate fails the handshake at once (a TLS alert), so
    this answers in milliseconds either way."""
    bundle = getattr(broker.pki, who)
    try:
        client = RawClient(broker.host, broker.port, broker.pki.pki.ca_cert_path, bundle)
        try:
            _present, code = client.connect(bundle.identity.id)
        finally:
            client.sock.close()
    except (ssl.SSLError, OSError):
        return False
    return code == 0


def fieldline_cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FIELDLINE_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "fieldline", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def own_pki(tmp_path: Path) -> TestPki:
    return build_test_pki(tmp_path / "own")


@pytest.fixture
def stopper() -> Iterator[list[BrokerUnderTest]]:
    started: list[BrokerUnderTest] = []
    yield started
    for broker in started:
        broker.stop()


def test_embedded_broker_logs_a_stale_crl_once_refuses_everyone_until_renewed(
    own_pki: TestPki, tmp_path: Path, stopper: list[BrokerUnderTest]
) -> None:
    pki = own_pki.pki
    home = pki.root.parent
    broker = start_fieldline(
        own_pki, tmp_path / "broker", {"FIELDLINE_CERTS__CRL_AUTO_RENEW": "false"}
    )
    stopper.append(broker)
    short = pki.renew_crl(days=3 / DAY_S)  # the broker loads it, then it goes stale
    wait_until(lambda: "event=crl_reloaded" in broker.log_text(), 10, "the broker to load it")
    assert "event=crl_expired" not in broker.log_text()

    wait_past(short.next_update)
    wait_until(lambda: "event=crl_expired" in broker.log_text(), 10, "the crl_expired line")
    line = next(x for x in broker.log_text().splitlines() if "event=crl_expired" in x)
    assert f"next_update={short.next_update.isoformat()}" in line  # type: ignore[union-attr]
    assert "run: fieldline certs crl renew" in line
    assert not connects(broker, "device")  # a stale CRL refuses every client

    shown = fieldline_cli(home, "certs", "crl")
    assert shown.returncode == 2, shown.stdout + shown.stderr
    assert "EXPIRED" in shown.stdout
    assert "event=crl_expired next_update=" in shown.stderr

    # the refresh loop ran many times (every 0.3 s) meanwhile: one line, not one per pass
    assert broker.log_text().count("event=crl_expired") == 1

    pki.renew_crl()  # what `fieldline certs crl renew` does (tests/unit/test_certs.py runs it)
    wait_until(lambda: "event=crl_current" in broker.log_text(), 10, "the crl_current line")
    assert connects(broker, "device")
    assert not connects(broker, "revoked")
    assert read_crl(pki.crl_path).serials == short.serials
    assert own_pki.revoked.serial in short.serials
    assert broker.log_text().count("event=crl_expired") == 1


def test_embedded_broker_renews_its_crl_when_a_third_remains(
    own_pki: TestPki, tmp_path: Path, stopper: list[BrokerUnderTest]
) -> None:
    pki = own_pki.pki
    env = {
        "FIELDLINE_CERTS__CRL_VALIDITY_DAYS": str(60 / DAY_S),
        "FIELDLINE_CERTS__CRL_RENEW_CHECK_S": "0.2",
    }
    broker = start_fieldline(own_pki, tmp_path / "broker", env)
    stopper.append(broker)
    short = pki.renew_crl(days=6 / DAY_S)  # renewal due ~4 s from now, expired in 6
    assert "event=crl_renewed" not in broker.log_text()  # 30 days left at start: not due

    wait_until(lambda: "event=crl_renewed" in broker.log_text(), 15, "the broker's renewal")
    assert short.renew_from() is not None
    assert datetime.now(UTC) >= short.renew_from()  # type: ignore[operator]
    status = pki.crl_status()
    assert status.validity == timedelta(seconds=66)  # broker's settings, 6 s backdate
    assert status.serials == short.serials
    assert own_pki.revoked.serial in status.serials
    wait_until(
        lambda: broker.log_text().count("event=crl_reloaded") >= 2, 10, "the broker to load it"
    )

    wait_past(short.next_update)  # the short CRL is stale now: only the renewal lets anyone in
    assert connects(broker, "device")
    assert not connects(broker, "revoked")
    assert "event=crl_expired" not in broker.log_text()


def test_mosquitto_refuses_on_a_stale_crl_and_the_up_loop_renews_renders_and_reloads(
    own_pki: TestPki, tmp_path: Path, stopper: list[BrokerUnderTest]
) -> None:
    pki = own_pki.pki
    workdir = tmp_path / "mosquitto"
    short = pki.renew_crl(days=2 / DAY_S)
    broker = start_rendered_mosquitto(own_pki, workdir)
    stopper.append(broker)
    copy = workdir / "certs" / "crl.pem"
    assert copy.read_bytes() == pki.crl_path.read_bytes()

    wait_past(short.next_update)
    assert not connects(broker, "device")
    # the check the renewal unit runs on Mosquitto's copy: Mosquitto cannot log our line
    shown = fieldline_cli(pki.root.parent, "certs", "crl", "show", "--file", str(copy))
    assert shown.returncode == 2, shown.stdout + shown.stderr
    assert f"file={copy}" in shown.stderr
    assert "event=crl_expired" in shown.stderr

    # what `fieldline up` runs for Mosquitto: the renewal loop, re-render and SIGHUP
    renewer = Renewer(Pki(pki.root, crl_validity_days=60 / DAY_S), check_s=0.2)
    options = _mosquitto_options(broker.port)

    async def renew_once() -> None:
        task = asyncio.create_task(
            renewer.run(lambda _new: reload_mosquitto(pki, workdir, options, broker.proc))
        )
        try:
            # polling a file: there is no event to wait on
            while read_crl(copy).expired():  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        finally:
            task.cancel()

    asyncio.run(asyncio.wait_for(renew_once(), 15))
    assert copy.read_bytes() == pki.crl_path.read_bytes()
    assert read_crl(copy).serials == short.serials
    wait_until(lambda: connects(broker, "device"), 10, "Mosquitto to accept the device again")
    assert not connects(broker, "revoked")
    assert broker.proc.poll() is None  # reloaded, not restarted
