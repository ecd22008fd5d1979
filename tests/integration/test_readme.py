"""The walk-throughs of the README and docs/*.md, run as written: each shell line between the
markers (`<!-- walkthrough:NAME -->` ... `<!-- /walkthrough:NAME -->`) is a step.

`fieldline` lines run as they are (in a scratch directory, so FIELDLINE_HOME is the default
./.fieldline); ports 8883 and 9883 become free ones; `mosquitto` and `fieldline broker run`
start in the background as a reader would start them in another terminal; `pkill -HUP`
becomes a SIGHUP to that Mosquitto only (other tests' brokers run beside it). A step the
runner does not know fails the test, so no page can grow an untested command; a walk-through
no test here runs fails `test_every_walkthrough_is_run`, so moving one between pages keeps it
tested and adding one needs a test.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from certs import Pki
from core.pgcluster import free_port
from tests.fixtures.mosquitto import MosquittoProcess, start_mosquitto
from tests.fixtures.prereq import require_binary

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
OPENING = re.compile(r"^<!-- walkthrough:([\w-]+) -->\s*$", re.MULTILINE)
# the walk-throughs the tests below run, by name
TESTED = {"certs", "broker", "modbus", "opcua"}
TELEMETRY_LINE = 'fl/acme/pump-1/telemetry {"metrics":{"temperature":21.5}}'

Step = str | tuple[str, str]


def walkthroughs() -> dict[str, tuple[Path, str]]:
    """Every walk-through of the README and docs/*.md: its name -> (page, text inside markers)."""
    found: dict[str, tuple[Path, str]] = {}
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for opening in OPENING.finditer(text):
            name = opening[1]
            end = text.find(f"<!-- /walkthrough:{name} -->", opening.end())
            assert end != -1, f"{page.name}: walk-through {name!r} is never closed"
            assert name not in found, f"{name!r} is in {found[name][0].name} and {page.name}"
            found[name] = (page, text[opening.end() : end])
    return found


def walkthrough(name: str) -> list[Step]:
    """The shell lines (and heredocs, as (file, body)) of the walk-through `name`, on any page."""
    found = walkthroughs()
    assert name in found, f"no page of the README or docs/ has the walk-through {name!r}"
    steps: list[Step] = []
    in_block, heredoc, body = False, None, []
    for line in found[name][1].splitlines():
        if line.startswith("```"):
            in_block = line.strip() == "```sh"
            continue
        if not in_block:
            continue
        if heredoc is not None:
            if line.strip() == heredoc[1]:
                steps.append((heredoc[0], "\n".join(body) + "\n"))
                heredoc, body = None, []
            else:
                body.append(line)
        elif "<<" in line:
            target, marker = line.split(">", 1)[1].split("<<")
            heredoc = (target.strip(), marker.strip())
        elif line.strip():
            steps.append(line)
    return steps


class Runner:
    """Runs steps in a scratch directory; keeps what the tests assert on."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.ports = {"8883": str(free_port()), "9883": str(free_port())}
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FIELDLINE_")}
        self.mosquitto: MosquittoProcess | None = None
        self.broker: subprocess.Popen[bytes] | None = None
        self.sub: subprocess.Popen[str] | None = None
        self.outputs: list[tuple[str, subprocess.CompletedProcess[str]]] = []
        self.ran: list[str] = []

    def _ports(self, text: str) -> str:
        for old, new in self.ports.items():
            text = text.replace(old, new)
        return text

    def run(self, step: Step) -> None:
        if isinstance(step, tuple):
            path, body = step
            body = self._ports(body)
            if os.geteuid() == 0 and path.endswith(".conf"):
                body += "user root\n"  # as root mosquitto would drop to an account without access
            (self.workdir / path).write_text(body)
            self.ran.append("config")
            return
        if "|" in step:  # a pipeline, e.g. curl ... | grep ...: through the shell
            out = subprocess.run(
                ["bash", "-o", "pipefail", "-c", self._ports(step)],
                capture_output=True, text=True, cwd=self.workdir, env=self.env, timeout=30,
                check=False,
            )  # fmt: skip
            assert out.returncode == 0, f"{step}\n{out.stderr}"
            self.outputs.append((step, out))
            self.ran.append(step.split()[0])
            return
        argv = [self._ports(a) for a in shlex.split(step, comments=True)]
        match argv:
            case ["fieldline", "broker", "run", *_]:
                self._start_broker(argv)
            case ["fieldline", *rest]:
                out = subprocess.run(
                    [sys.executable, "-m", "fieldline", *rest],
                    capture_output=True, text=True, env=self.env, cwd=self.workdir, check=False,
                    timeout=60,
                )  # fmt: skip
                assert out.returncode == 0, f"{step}\n{out.stderr}"
                self.outputs.append((step, out))
            case ["mosquitto", "-c", config]:
                pki = Pki(self.workdir / ".fieldline" / "pki")
                probe = next(
                    r.id for r in pki.records() if r.revoked_at is None and r.role != "server"
                )
                self.mosquitto = start_mosquitto(
                    pki, pki.bundle("broker"), pki.bundle(probe), self.workdir / "mq",
                    (self.workdir / config).read_text(), int(self.ports["8883"]), cwd=self.workdir,
                )  # fmt: skip
            case ["mosquitto_sub", *rest]:
                self.sub = subprocess.Popen(
                    [require_binary("mosquitto_sub"), *rest],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=self.workdir,
                )  # fmt: skip
                time.sleep(0.7)
            case ["mosquitto_pub", *rest]:
                out = subprocess.run(
                    [require_binary("mosquitto_pub"), *rest],
                    capture_output=True, text=True, check=False, timeout=15, cwd=self.workdir,
                )  # fmt: skip
                self.outputs.append((step, out))
            case ["pkill", "-HUP", "-x", "mosquitto"]:
                assert self.mosquitto is not None
                self.mosquitto.reload()
                time.sleep(0.5)
            case _:
                raise AssertionError(f"the walk-through has a step this test cannot run: {step}")
        self.ran.append(" ".join(argv[:3]) if argv[0] == "fieldline" else argv[0])

    def _start_broker(self, argv: list[str]) -> None:
        log = self.workdir / "broker.log"
        with log.open("wb") as out:
            self.broker = subprocess.Popen(
                [sys.executable, "-m", *argv],
                stdout=out,
                stderr=out,
                env=self.env,
                cwd=self.workdir,
            )
        deadline = time.monotonic() + 20
        while "event=ready" not in log.read_text():
            assert self.broker.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)

    def subscriber_lines(self) -> list[str]:
        assert self.sub is not None
        time.sleep(0.7)
        self.sub.terminate()
        out, _err = self.sub.communicate(timeout=10)
        return [line for line in out.splitlines() if line]

    def close(self) -> None:
        if self.sub is not None and self.sub.poll() is None:
            self.sub.kill()
            self.sub.wait()
        if self.mosquitto is not None:
            self.mosquitto.stop()
        if self.broker is not None and self.broker.poll() is None:
            self.broker.send_signal(signal.SIGTERM)
            self.broker.wait(15)


def test_every_walkthrough_is_run() -> None:
    found = walkthroughs()
    assert set(found) == TESTED, {n: str(p.relative_to(REPO)) for n, (p, _) in found.items()}
    for name in found:
        assert walkthrough(name), f"walk-through {name!r} has no shell steps"


def test_certificate_walkthrough_with_mosquitto(tmp_path: Path) -> None:
    steps = walkthrough("certs")
    runner = Runner(tmp_path)
    try:
        for step in steps:
            if str(step).startswith("fieldline certs revoke"):
                # before revoking: the operator saw the device's telemetry, and only it
                assert runner.subscriber_lines() == [TELEMETRY_LINE]
            runner.run(step)
        assert runner.ran.count("fieldline certs issue") == 2
        assert {"config", "mosquitto", "mosquitto_sub", "mosquitto_pub", "pkill"} <= set(runner.ran)
        # `certs issue` printed, for the operator, exactly the README's mosquitto_sub line
        printed = next(out.stdout for step, out in runner.outputs if "--role operator" in step)
        sub_line = next(s for s in steps if str(s).startswith("mosquitto_sub"))
        assert sub_line in printed.splitlines()
        # the publish worked before the revocation; after it and the SIGHUP it is refused
        pub_step, first = next((s, o) for s, o in runner.outputs if s.startswith("mosquitto_pub"))
        assert first.returncode == 0, first.stderr
        runner.run(pub_step)
        assert runner.outputs[-1][1].returncode != 0
    finally:
        runner.close()


def test_embedded_broker_walkthrough(tmp_path: Path) -> None:
    runner = Runner(tmp_path)
    try:
        for step in walkthrough("broker"):
            runner.run(step)
        assert "fieldline broker run" in runner.ran
        pubs = [o for s, o in runner.outputs if s.startswith("mosquitto_pub")]
        assert [p.returncode for p in pubs] == [0, 0]  # MQTT 3.1.1 cannot refuse a publish...
        assert runner.subscriber_lines() == [TELEMETRY_LINE]  # ...but nobody gets the forged one
        metrics = next(o.stdout for s, o in runner.outputs if s.startswith("curl"))
        assert (
            'fieldline_broker_denials_total{action="publish",reason="not-granted"} 1.0' in metrics
        )
        assert "event=denied client=pump-1 action=publish topic='fl/acme/pump-2/telemetry'" in (
            (tmp_path / "broker.log").read_text()
        )
    finally:
        runner.close()


@pytest.mark.parametrize("name", ["modbus", "opcua"])
def test_field_module_manifest_walkthroughs(tmp_path: Path, name: str) -> None:
    """docs/edge.md's Modbus and OPC UA manifests, written and checked as the page shows them
    (running the agent needs the machine; tests/integration/test_edge_*.py bring one)."""
    runner = Runner(tmp_path)
    try:
        for step in walkthrough(name):
            runner.run(step)
        assert runner.ran == ["config", "fieldline edge check"]
        checked = next(o.stdout for s, o in runner.outputs if "edge check" in s)
        assert "1 module(s), 1 rule(s), 4 route(s)" in checked
    finally:
        runner.close()
