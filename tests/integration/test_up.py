"""`fieldline up` as a user runs it: everything comes up, data flows, a command goes to a
device and comes back, and Ctrl-C leaves nothing running."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from core.pgcluster import free_port
from tests.fixtures.nats import free_port_block
from tests.fixtures.prereq import stop_process

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _using(home: Path) -> list[str]:
    """Processes whose command line names the stack's data directory (postgres -D ..., etc.)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(home) in cmdline:
            found.append(f"{entry.name}: {cmdline.strip()}")
    return found


@pytest.mark.parametrize("broker", ["embedded", "mosquitto", "nats"])
def test_up_runs_the_pipeline_and_stops_cleanly(tmp_path: Path, broker: str) -> None:
    # PostgreSQL runs as `postgres` when we are root: its data must be reachable for it
    scratch = Path(tempfile.mkdtemp(prefix="fl-up-"))
    scratch.chmod(0o711)
    home = scratch / "home"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "FIELDLINE_HOME": str(home),
        "FIELDLINE_BROKER__PORT": str(free_port_block(3)),
        "FIELDLINE_BROKER__METRICS_PORT": "0",
        "FIELDLINE_INGEST__METRICS_PORT": str(free_port()),
        "FIELDLINE_WEB__PORT": "0",
        "FIELDLINE_LOG_LEVEL": "INFO",
    }
    if broker == "nats":  # three nodes, each on its own MQTT, client and route port
        mqtt = int(env["FIELDLINE_BROKER__PORT"])
        client = free_port_block(3, set(range(mqtt, mqtt + 3)))
        taken = set(range(mqtt, mqtt + 3)) | set(range(client, client + 3))
        env["FIELDLINE_NATS__CLIENT_PORT"] = str(client)
        env["FIELDLINE_NATS__CLUSTER_PORT"] = str(free_port_block(3, taken))
    env.pop("FIELDLINE_DATABASE_URL", None)
    log = (tmp_path / "up.log").open("wb")
    up = subprocess.Popen(
        [sys.executable, "-m", "fieldline", "up", "--devices", "3", "--interval", "0.5",
         "--broker", broker],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip

    def cli(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "fieldline", *argv],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    def text() -> str:
        return (tmp_path / "up.log").read_text(errors="replace")

    try:
        deadline = time.monotonic() + 120
        while "Ctrl-C stops everything" not in text():
            assert up.poll() is None, text()[-3000:]
            assert time.monotonic() < deadline, text()[-3000:]
            time.sleep(0.2)
        watch = next(x for x in text().splitlines() if x.startswith("mosquitto_sub "))
        # rows arrive: the fleet's devices are listed with their metrics
        deadline = time.monotonic() + 60
        while True:
            listed = cli("devices", "list", "demo", "--json")
            devices = [json.loads(line) for line in listed.stdout.splitlines()] if (
                listed.returncode == 0) else []  # fmt: skip
            sims = [d for d in devices if d["id"].startswith("sim-") and d["metrics"]]
            if len(sims) == 3:
                break
            assert time.monotonic() < deadline, (listed.stderr, text()[-2000:])
            time.sleep(1)
        # the printed line runs as is, and as its own identity: `tail` next to it gets every
        # line (when both were `operator`, they took each other's session: 1 line of 3 in 20 s)
        watched = tmp_path / "watch.txt"
        with watched.open("wb") as out:
            # -d: mosquitto_sub logs each CONNECT it sends, so a session taken over shows
            sub = subprocess.Popen([*shlex.split(watch), "-d"], stdout=out,
                                   stderr=subprocess.STDOUT)  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while "/telemetry " not in watched.read_text(errors="replace"):
                assert sub.poll() is None, watched.read_text(errors="replace")
                assert time.monotonic() < deadline, watched.read_text(errors="replace")
                time.sleep(0.2)
            tailed = cli("tail", "demo", "--count", "3", "--seconds", "20")
            assert tailed.returncode == 0, tailed.stderr
            assert len(tailed.stdout.splitlines()) == 3, (tailed.stdout, tailed.stderr)
            seen = len(watched.read_text(errors="replace").splitlines())
            deadline = time.monotonic() + 10
            while len(watched.read_text(errors="replace").splitlines()) <= seen:
                assert sub.poll() is None, watched.read_text(errors="replace")[-2000:]
                assert time.monotonic() < deadline, "mosquitto_sub stopped receiving"
                time.sleep(0.2)
            connects = watched.read_text(errors="replace").count(" sending CONNECT")
            assert connects == 1, f"mosquitto_sub was thrown out {connects - 1} time(s)"
        finally:
            stop_process(sub)
        # the printed console URL serves the API, with the token `up` keeps for the demo
        url = next(x for x in text().splitlines() if x.startswith("The web console: "))
        base = url.split()[3]
        token = (home / "web-token").read_text().strip()
        assert (home / "web-token").stat().st_mode & 0o777 == 0o600
        assert base.startswith("http://127.0.0.1:"), base
        request = urllib.request.Request(  # noqa: S310 - the loopback URL checked above
            f"{base}api/v1/tenants/demo/devices", headers={"Authorization": f"Bearer {token}"}
        )
        with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310
            listed_web = json.load(answer)["devices"]
        assert {d["id"] for d in listed_web} >= {d["id"] for d in sims}
        sent = cli("cmd", "send", "demo", "sim-0001", "reset", "--wait", "--timeout", "30")
        assert sent.returncode == 0, (sent.stdout, sent.stderr)
        assert json.loads(sent.stdout.splitlines()[-1])["status"] == "ok"
        queried = cli("query", "demo", "sim-0001", "temperature", "--since", "10m",
                      "--bucket", "5s", "--format", "json")  # fmt: skip
        assert queried.returncode == 0, queried.stderr
        assert sum(json.loads(line)["count"] for line in queried.stdout.splitlines()) > 0
        assert any("postgres" in p for p in _using(home)), "the embedded PostgreSQL runs"
        # a second `fieldline up` in the same folder refuses in one line, starting and
        # stopping nothing (it once failed on the port and stopped the first's PostgreSQL)
        second = cli("up", "--devices", "1", "--broker", broker)
        assert second.returncode == 2, (second.stdout, second.stderr)
        assert f"another `fieldline up` (pid {up.pid})" in second.stderr
        assert "Traceback" not in second.stdout + second.stderr
        assert len(second.stderr.strip().splitlines()) == 1, second.stderr
        assert up.poll() is None
        assert any("postgres" in p for p in _using(home)), "the first stack's PostgreSQL runs"
        again = cli("devices", "list", "demo", "--json")
        assert again.returncode == 0, again.stderr

        def stored() -> int:
            q = cli("query", "demo", "sim-0001", "temperature", "--since", "1h",
                    "--bucket", "1h", "--format", "json")  # fmt: skip
            assert q.returncode == 0, q.stderr
            return sum(json.loads(line)["count"] for line in q.stdout.splitlines())

        # and the first stack's data is intact and still growing
        before = stored()
        assert before > 0
        deadline = time.monotonic() + 30
        while stored() <= before:
            assert time.monotonic() < deadline, "the first stack stopped storing telemetry"
            time.sleep(1)
        up.send_signal(signal.SIGINT)
        assert up.wait(90) == 0, text()[-3000:]
        assert "stopped." in text()
        # `up` has waited for its children; the kernel may list one a moment longer
        deadline = time.monotonic() + 5
        while _using(home):
            assert time.monotonic() < deadline, f"still running after Ctrl-C: {_using(home)}"
            time.sleep(0.1)
        assert not (home / "pg" / "data" / "postmaster.pid").exists()
    finally:
        stop_process(up)
        log.close()
        pg = home / "pg"
        if (pg / "data" / "postmaster.pid").exists():  # never leave a server behind
            subprocess.run(
                [sys.executable, "-m", "fieldline", "db", "stop"], env=env, check=False,
                capture_output=True, timeout=60,
            )  # fmt: skip
        shutil.rmtree(scratch, ignore_errors=True)


def test_a_taken_port_is_one_line_and_nothing_starts(tmp_path: Path) -> None:
    """It once printed 95 lines with 3 tracebacks, after starting PostgreSQL for nothing."""
    home = tmp_path / "home"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "FIELDLINE_HOME": str(home),
            "FIELDLINE_BROKER__PORT": str(port),
            "FIELDLINE_BROKER__METRICS_PORT": "0",
            "FIELDLINE_INGEST__METRICS_PORT": "0",
            "FIELDLINE_WEB__PORT": "0",
        }
        env.pop("FIELDLINE_DATABASE_URL", None)
        done = subprocess.run(
            [sys.executable, "-m", "fieldline", "up", "--devices", "1", "--seconds", "5"],
            env=env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stderr.strip().splitlines() == [
        f"error: port {port} on 127.0.0.1 is not free (Address already in use): another broker "
        "or `fieldline up`? Stop it, or set broker.port (FIELDLINE_BROKER__PORT) to a free port"
    ]
    assert "Traceback" not in done.stdout
    assert not (home / "pg").exists(), "nothing was started"
