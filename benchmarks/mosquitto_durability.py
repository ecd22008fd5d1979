"""What a kill -9 of the rendered Mosquitto loses from a held queue; what saving more often costs.

    python -m benchmarks.mosquitto_durability                  # 30s,1s,1000c,100c,off; ~5 min
    python -m benchmarks.mosquitto_durability --settings 30s,100c --trials 1 --seed 7

Each setting is a rendered Mosquitto (`fieldline broker mosquitto-config`) with persistence:
`30s` is `autosave_interval 30` (save every 30 s), `100c` is `autosave_on_changes true` with
`autosave_interval 100` (save after 100 changes: a message queued for a session, or a PUBACK
from one, counts as one), `off` is `persistence false`. For every setting, in one run:

  loss        the ingest worker's persistent session (clean_session=False, QoS 1) subscribes
              and goes away, so Mosquitto queues for it; 4 devices publish QoS 1 at --rate msg/s
              in all, counting PUBACKs; Mosquitto is killed with SIGKILL at a random moment of
              the stream (the same fraction of one save cycle for every setting of a pass; a
              time-based stream starts just after Mosquitto's first save), started again with
              the same config, and the session reconnects and takes what was kept.
              lost = PUBACKed - received (distinct).
  in flight   the session stays connected and holds its PUBACKs (a worker whose database is
              down): --in-flight messages are sent to it and held --hold s, then kill -9.
  throughput  the held queue at each of --depths messages, devices publishing as fast as they
              are acknowledged (at most --window unacknowledged each) for --tp-seconds:
              PUBACKed msg/s. Each save rewrites and fsyncs the whole database, so it costs
              more as the queue grows.

Passes alternate the order of the settings (A B C, then C B A: ABBA), so drift on the shared
machine does not favour one. Loopback only; Mosquitto runs on the same 2 cores as the devices.
Certificates are issued once into .fieldline/bench/durability/pki.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.broker import PAYLOAD, PUBLISHERS, TENANT, bundle_paths, prepare_pki, wait_ready
from benchmarks.mosquitto_limits import Broker, start_broker
from benchmarks.mqttload import MqttLoadProtocol, client_context, open_client
from broker import wire
from broker.mosquitto import MosquittoOptions
from certs import Pki, Role
from tests.mqtt_raw import RawClient

REPO = Path(__file__).resolve().parents[1]
HOME = REPO / ".fieldline" / "bench" / "durability"
SUBSCRIBER = "bench-svc"  # a `service` certificate, as the ingest worker's
TELEMETRY = "fl/+/+/telemetry"
SEQ_DIGITS = 10
QUEUE_CAP = 2_000_000
MAX_DEPTH = 1_000_000
START = 2.0  # seconds into the stream before the earliest kill


@dataclass(frozen=True)
class Setting:
    """One persistence setting of the rendered config, from a spec: `30s`, `100c` or `off`."""

    spec: str
    persistence: bool
    interval: int = 0
    on_changes: bool = False

    @property
    def label(self) -> str:
        if not self.persistence:
            return "persistence false"
        if self.on_changes:
            return f"on_changes, interval {self.interval}"
        return f"autosave_interval {self.interval}"

    def options(self, data: Path) -> MosquittoOptions:
        # a queue past the rendered 200,000 is dropped, cheaply, which would flatter the
        # throughput of a setting fast enough to get there: the benchmark's queue is larger
        return MosquittoOptions(
            persistence_dir=data if self.persistence else None,
            autosave_interval=self.interval or 1,
            autosave_on_changes=self.on_changes,
            max_queued_messages=QUEUE_CAP,
            max_queued_bytes=0,
        )


def parse_setting(spec: str) -> Setting:
    """`off`, `<n>s` (every n seconds) or `<n>c` (every n changes); SystemExit otherwise."""
    spec = spec.strip()
    if spec == "off":
        return Setting(spec, persistence=False)
    number, unit = spec[:-1], spec[-1:]
    if unit in ("s", "c") and number.isdigit() and int(number) > 0:
        return Setting(spec, persistence=True, interval=int(number), on_changes=unit == "c")
    raise SystemExit(f"setting {spec!r}: write `off`, `<n>s` (seconds) or `<n>c` (changes)")


FILL = Setting("3600s", persistence=True, interval=3600)  # saves only at shutdown


def prepare(home: Path) -> Pki:
    """benchmarks.broker's PKI (service + 4 publishers) and the `probe` the readiness check uses."""
    pki = prepare_pki(home, 0)
    if "probe" not in {r.id for r in pki.records()}:
        pki.issue("probe", tenant=TENANT, role=Role.DEVICE)
    return pki


# -- Mosquitto -------------------------------------------------------------------------------
def start(setting: Setting, pki: Pki, workdir: Path, fresh: bool = True) -> Broker:
    """Mosquitto with the setting, on a free port; `fresh`: with an empty persistence directory."""
    if fresh:
        shutil.rmtree(workdir, ignore_errors=True)
    return start_broker("mosquitto", pki, workdir, setting.options(workdir / "data"))


def kill(broker: Broker) -> None:
    broker.proc.kill()
    broker.proc.wait()


def restart(broker: Broker, pki: Pki, workdir: Path) -> Broker:
    """The same config (and port) again, as systemd's Restart= would."""
    config = workdir / "mosquitto" / "mosquitto.conf"
    with broker.log.open("ab") as out:
        proc = subprocess.Popen(
            ["mosquitto", "-c", str(config)], stdout=out, stderr=out, cwd=workdir
        )
    again = Broker(broker.kind, broker.port, proc, broker.log)
    probe = pki.bundle("probe")
    wait_ready(again, client_context(pki.ca_cert_path, probe.cert, probe.key))
    return again


# -- clients ---------------------------------------------------------------------------------
def subscriber(pki: Pki, port: int) -> RawClient:
    """The worker's stand-in: a client that acknowledges only when told to."""
    return RawClient("127.0.0.1", port, pki.ca_cert_path, pki.bundle(SUBSCRIBER), timeout=30)


def park_session(pki: Pki, port: int) -> None:
    """The worker's session subscribes and disconnects: from now on Mosquitto queues for it."""
    client = subscriber(pki, port)
    assert client.connect(SUBSCRIBER, clean=False)[1] == 0
    assert client.subscribe((TELEMETRY, 1)) == [1]
    client.disconnect()


def drain(pki: Pki, port: int, idle: float) -> tuple[bool, dict[str, set[int]]]:
    """The session comes back: (session present, {device: sequence numbers received})."""
    client = subscriber(pki, port)
    present, rc = client.connect(SUBSCRIBER, clean=False)
    assert rc == 0
    received: dict[str, set[int]] = {}
    while (message := client.next_publish(idle)) is not None:
        device = message.topic.split("/")[2]
        received.setdefault(device, set()).add(int(message.payload[:SEQ_DIGITS]))
        client.puback(message.packet_id)
    client.disconnect()
    return present, received


@dataclass
class Device:
    """A publishing device: messages carry their sequence number; PUBACKs are counted."""

    client_id: str
    proto: MqttLoadProtocol
    sent: int = 0

    @property
    def acked(self) -> int:
        # Mosquitto answers one connection's QoS 1 PUBLISHes in order, so the first `acked`
        # messages are the acknowledged ones
        return self.proto.acked


async def connect_devices(pki: Pki, port: int) -> list[Device]:
    devices = []
    for i in range(PUBLISHERS):
        client_id, cert, key = bundle_paths(pki, f"pub-{i}")
        context = client_context(pki.ca_cert_path, Path(cert), Path(key))
        devices.append(Device(client_id, await open_client("127.0.0.1", port, context, client_id)))
    return devices


async def publish(
    device: Device, rate: float, window: int, stop: asyncio.Event, count: int = 0
) -> None:
    """QoS 1 at `rate` msg/s (0: as fast as acknowledged), at most `window` unacknowledged;
    with `count`, that many messages and then until they are all acknowledged."""
    proto = device.proto
    assert proto.transport is not None
    topic = f"fl/{TENANT}/{device.client_id}/telemetry".encode()
    started = time.monotonic()
    while not stop.is_set() and not proto.closed.done():
        if count and device.acked >= count:
            return
        ahead = rate and device.sent >= rate * (time.monotonic() - started)
        if ahead or device.sent - device.acked > window or (count and device.sent >= count):
            await asyncio.sleep(0.001)
            continue
        batch = bytearray()
        for _ in range(min(20, count - device.sent) if count else 20):
            seq = device.sent
            device.sent += 1
            payload = b"%0*d " % (SEQ_DIGITS, seq) + PAYLOAD
            batch += wire.publish(topic, payload, 1, False, packet_id=seq % 65535 + 1)
        proto.transport.write(bytes(batch))
        await proto.drain()


def close(devices: list[Device]) -> None:
    for device in devices:
        if device.proto.transport is not None:
            device.proto.transport.close()


# -- the measurements ------------------------------------------------------------------------
@dataclass
class Loss:
    kill_after: float
    acked: int
    received: int  # distinct, of the acknowledged ones
    extra: int  # received but never acknowledged (the PUBACK was lost with the process)
    session: bool

    @property
    def lost(self) -> int:
        return self.acked - self.received


async def _stream_then_kill(
    broker: Broker, devices: list[Device], rate: float, after: float
) -> None:
    stop = asyncio.Event()
    each = rate / len(devices)
    tasks = [asyncio.create_task(publish(d, each, 400, stop)) for d in devices]
    await asyncio.sleep(after)
    kill(broker)
    # what the devices had read before the connection died is what counts as PUBACKed
    await asyncio.wait([asyncio.ensure_future(d.proto.closed) for d in devices], timeout=10)
    stop.set()
    await asyncio.gather(*tasks)
    close(devices)


def measure_loss(
    setting: Setting, pki: Pki, workdir: Path, rate: float, after: float, idle: float
) -> Loss:
    """Queue for the parked session, kill -9 `after` s into the stream, restart, count."""
    broker = start(setting, pki, workdir)
    try:
        park_session(pki, broker.port)
        if setting.persistence and not setting.on_changes:
            # a long-running broker is killed at any point of its save cycle, not in the
            # first one, before anything was ever saved: the stream starts at a save
            wait_for_save(workdir / "data" / "mosquitto.db", setting.interval + 5)

        async def run() -> list[Device]:
            devices = await connect_devices(pki, broker.port)
            await _stream_then_kill(broker, devices, rate, after)
            return devices

        devices = asyncio.run(run())
        broker = restart(broker, pki, workdir)
        present, got = drain(pki, broker.port, idle)
    finally:
        broker.stop()
    return count_loss(after, devices, present, got)


def wait_for_save(path: Path, timeout: float) -> None:
    """Until Mosquitto has written its persistence file (it saves the first time one interval
    after it started)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"Mosquitto did not save {path} within {timeout:.0f} s")
        time.sleep(0.02)


def count_loss(
    after: float, devices: list[Device], present: bool, got: dict[str, set[int]]
) -> Loss:
    acked = sum(d.acked for d in devices)
    received = sum(sum(1 for s in got.get(d.client_id, ()) if s < d.acked) for d in devices)
    extra = sum(len(got.get(d.client_id, ())) for d in devices) - received
    return Loss(after, acked, received, extra, present)


def measure_in_flight(
    setting: Setting, pki: Pki, workdir: Path, count: int, hold: float, idle: float
) -> Loss:
    """The session stays connected and holds its PUBACKs (a worker whose database is down):
    `count` messages go straight into flight, unacknowledged; `hold` s later, kill -9."""
    broker = start(setting, pki, workdir)
    try:
        worker = subscriber(pki, broker.port)
        assert worker.connect(SUBSCRIBER, clean=False)[1] == 0
        assert worker.subscribe((TELEMETRY, 1)) == [1]
        devices, _took = asyncio.run(_publish_all(pki, broker.port, 400, count, 60))
        time.sleep(hold)
        kill(broker)
        worker.close()
        broker = restart(broker, pki, workdir)
        present, got = drain(pki, broker.port, idle)
    finally:
        broker.stop()
    return count_loss(hold, devices, present, got)


async def _publish_all(
    pki: Pki, port: int, window: int, count: int, seconds: float
) -> tuple[list[Device], float]:
    """Devices publish `count` messages in all as fast as acknowledged, for at most `seconds`:
    (the devices, seconds taken)."""
    devices = await connect_devices(pki, port)
    stop = asyncio.Event()
    each = -(-count // len(devices))
    started = time.monotonic()
    tasks = [asyncio.create_task(publish(d, 0, window, stop, each)) for d in devices]
    await asyncio.wait(tasks, timeout=seconds)
    took = time.monotonic() - started
    stop.set()
    await asyncio.gather(*tasks)
    close(devices)
    return devices, took


def measure_throughput(
    setting: Setting, pki: Pki, workdir: Path, depth: int, args: argparse.Namespace
) -> float:
    """PUBACKed msg/s while `depth` messages are already queued for the parked session.

    The queue is filled under FILL (no save until shutdown, which saves once) and Mosquitto
    is then started with the setting on it: filling at 100 changes a save would take minutes.
    """
    if depth and setting.persistence:
        broker = start(FILL, pki, workdir)
        park_session(pki, broker.port)
        devices, _ = asyncio.run(_publish_all(pki, broker.port, args.window, depth, 120))
        broker.stop()  # SIGTERM: Mosquitto saves the queue
        if (acked := sum(d.acked for d in devices)) < depth:
            raise SystemExit(f"filling the queue: {acked:,} of {depth:,} acknowledged")
        broker = start(setting, pki, workdir, fresh=False)
    else:
        broker = start(setting, pki, workdir)
        park_session(pki, broker.port)
        if depth:
            asyncio.run(_publish_all(pki, broker.port, args.window, depth, 120))
    try:
        devices, took = asyncio.run(
            _publish_all(pki, broker.port, args.window, args.tp_messages, args.tp_seconds)
        )
        return sum(d.acked for d in devices) / took
    finally:
        kill(broker)  # nothing to keep; SIGTERM would save the queue first


def kill_moment(setting: Setting, fraction: float, cycle: float) -> float:
    """Seconds into the stream: the same fraction of one save cycle for every setting."""
    if setting.persistence and not setting.on_changes:
        cycle = setting.interval + 1  # Mosquitto saves once more than `interval` s have passed
    return START + fraction * cycle


@dataclass
class Figures:
    setting: Setting
    losses: list[Loss] = field(default_factory=list)
    in_flight: Loss | None = None
    rates: dict[int, list[float]] = field(default_factory=dict)  # depth -> msg/s per pass

    def bound(self, rate: float) -> str:
        s = self.setting
        if not s.persistence:
            return "all"
        if s.on_changes:
            return f"{s.interval:,} msgs"
        return f"{(s.interval + 1) * rate:,.0f} msgs"


def print_table(figures: list[Figures], rate: float, hold: float, depths: list[int]) -> None:
    rate_heads = "".join(f" {f'msg/s @{d // 1000}k':>12}" for d in depths)
    print(
        f"\n{'setting':30} {'PUBACKed':>9} {'lost':>8} {'lost %':>7} {'max lost':>9} "
        f"{'bound':>12} {'in flight':>10}{rate_heads}"
    )
    for f in figures:
        acked = sum(x.acked for x in f.losses)
        lost = sum(x.lost for x in f.losses)
        worst = max((x.lost for x in f.losses), default=0)
        share = f"{100 * lost / acked:.1f}" if acked else "-"
        rates = "".join(
            f" {statistics.median(f.rates[d]):>12,.0f}" if f.rates.get(d) else f" {'-':>12}"
            for d in depths
        )
        flight = f"{f.in_flight.lost}/{f.in_flight.acked}" if f.in_flight else "-"
        print(
            f"{f.setting.label:30} {acked:>9,} {lost:>8,} {share:>7} {worst:>9,} "
            f"{f.bound(rate):>12} {flight:>10}{rates}"
        )
    print(
        f"lost: PUBACKed to a device (stream of {rate:,.0f} msg/s) but not delivered to the "
        "session after kill -9 and a restart, summed over passes; bound: what one save cycle "
        "holds; in flight: lost/PUBACKed of messages sent to the connected session, held "
        f"unacknowledged {hold:.0f} s before the kill; msg/s @Nk: PUBACKed QoS 1 msg/s with N "
        "messages already queued (median of passes)"
    )


def run(args: argparse.Namespace) -> None:
    settings = [parse_setting(s) for s in args.settings.split(",") if s.strip()]
    depths = sorted({int(d) for d in args.depths.split(",") if d.strip()})
    if args.trials < 1 or args.cycle <= 0 or min(depths) < 0 or max(depths) > MAX_DEPTH:
        raise SystemExit(f"--trials >= 1, --cycle > 0, --depths within 0..{MAX_DEPTH:,}")
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)  # noqa: S311 - a kill moment
    rng = random.Random(seed)  # noqa: S311 - reproducible kill moments
    print(f"preparing certificates in {args.home}; seed {seed}", flush=True)
    pki = prepare(args.home)
    figures = {s.spec: Figures(s) for s in settings}
    workdir = args.home / "run"
    started = time.monotonic()
    for trial in range(args.trials):
        order = settings if trial % 2 == 0 else settings[::-1]
        fraction = rng.random()
        for setting in order:
            after = kill_moment(setting, fraction, args.cycle)
            loss = measure_loss(setting, pki, workdir, args.rate, after, args.idle)
            figures[setting.spec].losses.append(loss)
            print(
                f"pass {trial + 1} {setting.label:30} kill -9 at {after:4.1f} s: "
                f"{loss.acked:>6,} PUBACKed, {loss.received:>6,} received, lost {loss.lost:>6,}"
                f" (+{loss.extra} unacknowledged received; session kept: {loss.session})",
                flush=True,
            )
        for setting in order if trial == 0 else ():
            loss = measure_in_flight(setting, pki, workdir, args.in_flight, args.hold, args.idle)
            figures[setting.spec].in_flight = loss
            print(
                f"pass {trial + 1} {setting.label:30} {loss.acked} in flight, held {args.hold} s:"
                f" lost {loss.lost} (session kept: {loss.session})",
                flush=True,
            )
        for setting in order:
            for depth in depths if trial % 2 == 0 else depths[::-1]:
                rate = measure_throughput(setting, pki, workdir, depth, args)
                figures[setting.spec].rates.setdefault(depth, []).append(rate)
                print(
                    f"pass {trial + 1} {setting.label:30} {depth:>7,} queued: "
                    f"{rate:>8,.0f} msg/s PUBACKed",
                    flush=True,
                )
    print_table(list(figures.values()), args.rate, args.hold, depths)
    print(f"took {time.monotonic() - started:.0f} s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--settings", default="30s,1s,1000c,100c,off",
                        help="comma-separated: <n>s, <n>c or off")  # fmt: skip
    parser.add_argument("--trials", type=int, default=2, help="passes, alternating the order")
    parser.add_argument("--rate", type=float, default=2000.0, help="msg/s of the loss stream")
    parser.add_argument("--cycle", type=float, default=5.0,
                        help="seconds the kill moment ranges over for on-changes and off "
                        "(time-based: the save interval + 1)")  # fmt: skip
    parser.add_argument("--depths", default="0,200000",
                        help="messages queued before throughput is measured")  # fmt: skip
    parser.add_argument("--tp-messages", type=int, default=400_000,
                        help="throughput: at most this many messages per measurement")  # fmt: skip
    parser.add_argument("--tp-seconds", type=float, default=3.0,
                        help="throughput: at most this long per measurement (time-based saves "
                        "come every interval + 1 s)")  # fmt: skip
    parser.add_argument("--in-flight", type=int, default=800,
                        help="messages in flight to the connected session (under the rendered "
                        "max_inflight_messages, 1000)")  # fmt: skip
    parser.add_argument("--hold", type=float, default=3.0,
                        help="seconds they are held unacknowledged before the kill")  # fmt: skip
    parser.add_argument("--window", type=int, default=400, help="unacknowledged per device")
    parser.add_argument("--idle", type=float, default=2.0,
                        help="the drain ends after this long without a message")  # fmt: skip
    parser.add_argument("--seed", type=int, help="for the kill moments")
    parser.add_argument("--home", type=Path, default=HOME)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
