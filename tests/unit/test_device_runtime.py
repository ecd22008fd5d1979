"""The device runtime without a network: boot counter, command intake, hand-off, layering."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from device_runtime.args import SetInterval, parse_args
from device_runtime.boot import BootCounter
from device_runtime.errors import CommandError
from device_runtime.handoff import Handoff
from device_runtime.intake import CommandIntake, Refusal, ReplayPolicy
from device_runtime.link import DeviceLink
from simulator.commands import ARGUMENTS as SIM_ARGUMENTS

REPO = Path(__file__).resolve().parents[2]


def test_the_boot_counter_survives_restarts_and_corruption(tmp_path: Path) -> None:
    counter = BootCounter(tmp_path / "acme" / "dev-1.boot")
    assert [counter.next() for _ in range(3)] == [1, 2, 3]
    assert BootCounter(counter.path).next() == 4
    counter.path.write_text("garbage")
    assert counter.next() == 1


NOW = 1_732_269_600.0  # 2024-11-22T10:00:00Z


class Recorder:
    """`apply` of a device: what ran."""

    def __init__(self) -> None:
        self.ran: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, name: str, args: dict[str, Any]) -> str:
        self.ran.append((name, args))
        return "done"


def _body(cid: str, ts_s: float | None = NOW, **extra: Any) -> bytes:
    body: dict[str, Any] = {"id": cid, "name": "set-interval", "args": {"interval_s": 2}, **extra}
    if ts_s is not None:
        body["ts"] = int(ts_s * 1000)
    return json.dumps(body).encode()


TOPIC = "fl/acme/dev-1/cmd/set-interval"


def test_retained_and_repeated_commands_are_refused_before_they_run() -> None:
    reasons: list[Refusal] = []
    intake = CommandIntake(ReplayPolicy(recent_ids=3), clock=lambda: NOW, on_refused=reasons.append)
    apply = Recorder()
    first = str(uuid.uuid4())
    cid, status, detail = intake.answer(TOPIC, _body(first), True, apply)
    assert (cid, status) == (first, "rejected")
    assert detail.startswith("refused: delivered retained")
    assert TOPIC in detail  # where to clear it
    assert apply.ran == []
    assert intake.answer(TOPIC, b"{not json", True, apply)[:2] == (None, "rejected")
    assert intake.answer(TOPIC, _body(first), False, apply)[1:] == ("ok", "done")
    cid, status, detail = intake.answer(TOPIC, _body(first), False, apply)
    assert (cid, status) == (first, "rejected")
    assert f"command {first} was received before (answered ok)" in detail
    assert len(apply.ran) == 1
    # a refusal for time is remembered too: the same id sent again is a repeat
    late = str(uuid.uuid4())
    assert intake.answer(TOPIC, _body(late, NOW - 100, ttl_s=10), False, apply)[1] == "expired"
    assert "(answered expired)" in intake.answer(TOPIC, _body(late), False, apply)[2]
    # bounded: the oldest id is forgotten once `recent_ids` newer ones were answered
    for _ in range(2):
        intake.answer(TOPIC, _body(str(uuid.uuid4())), False, apply)
    assert (len(intake.recent), intake.recent.forgotten) == (3, 1)
    assert intake.answer(TOPIC, _body(first), False, apply)[1] == "ok"
    assert reasons == ["retained", "retained", "duplicate", "expired", "duplicate"]
    assert intake.refused == {"retained": 2, "duplicate": 2, "expired": 1}


def test_commands_out_of_their_time_are_refused() -> None:
    policy = ReplayPolicy(default_ttl_s=60, max_clock_skew_s=30)
    intake = CommandIntake(policy, clock=lambda: NOW)
    apply = Recorder()

    def answer(ts_s: float | None, **extra: Any) -> tuple[str, str]:
        _cid, status, detail = intake.answer(
            TOPIC, _body(str(uuid.uuid4()), ts_s, **extra), False, apply
        )
        return status, detail

    status, detail = answer(None)
    assert (status, detail.split(";")[0]) == ("rejected", "refused: no ts")
    assert answer(NOW - 59)[0] == "ok"  # no ttl_s: the default 60 s
    status, detail = answer(NOW - 61)
    assert status == "expired"
    assert detail.startswith("expired at 2024-11-22T09:59:59.000Z (ts + ttl_s 60 s, the default")
    assert answer(NOW - 61, ttl_s=120)[0] == "ok"
    assert answer(NOW - 11, ttl_s=10)[0] == "expired"
    assert answer(NOW + 30)[0] == "ok"  # within the skew allowed
    status, detail = answer(NOW + 45)
    assert status == "rejected"
    assert "45 s ahead of this device's clock (2024-11-22T10:00:00.000Z; at most 30 s" in detail
    assert len(apply.ran) == 3
    assert intake.refused == {"no_ts": 1, "expired": 2, "future_ts": 1}


def test_a_device_without_a_set_clock_skips_only_the_time_checks() -> None:
    intake = CommandIntake(clock=lambda: 30.0)  # 1970: a board without RTC before NTP
    apply = Recorder()
    once = str(uuid.uuid4())
    assert intake.answer(TOPIC, _body(once, None), False, apply)[1] == "ok"
    assert intake.answer(TOPIC, _body(str(uuid.uuid4()), NOW - 10**6), False, apply)[1] == "ok"
    assert intake.answer(TOPIC, _body(once, None), False, apply)[1] == "rejected"
    assert intake.answer(TOPIC, _body(str(uuid.uuid4())), True, apply)[1] == "rejected"
    assert len(apply.ran) == 2


def test_the_policy_refuses_limits_that_cannot_work() -> None:
    for bad in ({"recent_ids": 0}, {"default_ttl_s": 0}, {"max_clock_skew_s": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ReplayPolicy(**bad)  # type: ignore[arg-type]


def test_the_edge_agent_imports_neither_the_simulator_nor_statsmodels() -> None:
    """A gateway with real sources must not ship the simulator to talk MQTT."""
    code = (
        "import json, sys\n"
        "import edge_agent.agent, edge_agent.cli, edge_agent.manifest\n"
        "heavy = {'simulator', 'statsmodels'}\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in heavy)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert json.loads(done.stdout) == []


def test_the_runtime_imports_no_higher_layer() -> None:
    allowed = {"device_runtime", "core", "schemas", "certs"}
    ours = {"simulator", "edge_agent", "broker", "ingest_worker", "fieldline", *allowed}
    for path in sorted((REPO / "device_runtime").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top not in ours - allowed, f"{path.name} imports {name}"


def test_no_private_paho_attribute_is_touched() -> None:
    """`x.client._anything` or `mqtt._anything`: paho's private API, gone in any release."""
    for package in ("device_runtime", "edge_agent", "simulator"):
        for path in sorted((REPO / package).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.Attribute) or not node.attr.startswith("_"):
                    continue
                owner = node.value
                name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", "")
                assert name not in ("client", "mqtt", "paho"), (
                    f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)}"
                )


def test_only_the_simulator_takes_sensor_commands() -> None:
    assert parse_args("set-interval", {"interval_s": 2}) == SetInterval(interval_s=2.0)
    with pytest.raises(CommandError, match=r"known: reset, set-interval$") as unknown:
        parse_args("sensor-add", {"id": "t2", "type": "temperature"})
    assert unknown.value.status == "rejected"
    assert set(SIM_ARGUMENTS) == {"reset", "set-interval", "sensor-add", "sensor-remove"}


# -- the hand-off from a store to the link -----------------------------------------------


@dataclass(frozen=True)
class Row:
    topic: str
    payload: bytes
    ids: tuple[int, ...]


class Store:
    """An in-memory store with the outbox's contract: in-flight rows are skipped."""

    def __init__(self, n: int) -> None:
        self.rows = {i: Row("t", b"%d" % i, (i,)) for i in range(1, n + 1)}
        self.in_flight: set[int] = set()

    def backlog_batches(self, limit_messages: int, batch_samples: int) -> list[Row]:
        pending = [r for i, r in sorted(self.rows.items()) if i not in self.in_flight]
        return pending[:limit_messages]

    def mark_in_flight(self, ids: Iterable[int]) -> None:
        self.in_flight.update(ids)

    def ack(self, ids: Iterable[int]) -> int:
        gone = [self.rows.pop(i) for i in ids if i in self.rows]
        self.in_flight.difference_update(ids)
        return len(gone)


class Link:
    """The link's publishing surface: a window, a connected flag, message ids."""

    def __init__(self, inflight: int) -> None:
        self.inflight = inflight
        self.connected = False
        self.sent: list[bytes] = []

    def publish(self, topic: str, payload: bytes) -> SimpleNamespace:
        self.sent.append(payload)
        return SimpleNamespace(mid=len(self.sent))


def test_the_handoff_keeps_the_window_and_deletes_only_what_was_acknowledged() -> None:
    store, link = Store(5), Link(inflight=2)
    handoff = Handoff(cast(DeviceLink, link), store)
    assert handoff.pump() == 0  # offline: everything stays in the store
    link.connected = True
    assert handoff.pump() == 2
    assert handoff.pump() == 0  # the window is full
    assert (link.sent, handoff.in_flight) == ([b"1", b"2"], 2)
    assert handoff.acked(2) == 1
    assert sorted(store.rows) == [1, 3, 4, 5]
    assert handoff.acked(2) == 0  # a PUBACK repeated or unknown acks nothing
    assert handoff.pump() == 1
    assert link.sent[-1] == b"3"
