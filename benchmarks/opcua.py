"""OPC UA intake: values per second one edge agent module takes from a subscription, and its CPU.

    python -m benchmarks.opcua                               # 1,000 items, 10 updates/s each
    python -m benchmarks.opcua --items 1000 --rate 50 --seconds 20 --publishing 0.1

An asyncua server in a child process (so its CPU is not counted) holds --items Double
variables and writes all of them --rate times a second. One `edge_agent.opcua.OpcUaModule`
subscribes to every item (one subscription, sampling 0 = as fast as the server changes,
publishing every --publishing s) and hands its readings to a counter instead of the agent
(routing and the outbox are measured by the agent's own benchmarks). Reported: values the
server wrote and the module emitted per second, the readings (messages) per second, and
the module process's CPU (time.process_time) per second and per value.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from core.pgcluster import free_port


async def serve(port: int, items: int, rate: float, progress: Path) -> None:
    """The child: a server whose `items` variables all change `rate` times a second."""
    from asyncua import Server, ua

    server = Server()
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}/bench")
    server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    ns = await server.register_namespace("urn:fieldline:bench")
    folder = await server.nodes.objects.add_folder(ua.NodeId("Bench", ns), "Bench")
    nodes = [
        await folder.add_variable(ua.NodeId(f"V{i}", ns), f"V{i}", 0.0, ua.VariantType.Double)
        for i in range(items)
    ]
    await server.start()
    print("ready", flush=True)
    tick, n = 1.0 / rate, 0
    next_at = time.monotonic()
    while True:
        n += 1
        for i, node in enumerate(nodes):
            await server.write_attribute_value(node.nodeid, ua.DataValue(ua.Variant(float(n + i))))
        progress.write_text(str(n * items))  # noqa: ASYNC240 - a few bytes, for the parent
        next_at = max(next_at + tick, time.monotonic() - 1.0)  # a slow server does not bunch up
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))


async def measure(items: int, rate: float, seconds: float, publishing: float) -> dict[str, Any]:
    """Subscribe one module to the child server's items; count for `seconds` after warm-up."""
    from edge_agent.manifest import ModuleSpec
    from edge_agent.opcua import OpcUaModule

    port = free_port()
    progress = Path(tempfile.mkdtemp(prefix="fieldline-bench-opcua-")) / "written"
    child = subprocess.Popen(  # noqa: ASYNC220 - once, before measuring
        [sys.executable, "-m", "benchmarks.opcua", "--serve", str(port), "--items", str(items),
         "--rate", str(rate), "--progress", str(progress)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert child.stdout is not None
        if child.stdout.readline().strip() != "ready":
            raise SystemExit("the benchmark's OPC UA server did not start")
        spec = ModuleSpec.model_validate({
            "name": "bench", "kind": "opcua", "url": f"opc.tcp://127.0.0.1:{port}/bench",
            "publishing_interval_s": publishing, "sampling_interval_s": 0.0,
            "nodes": [{"node": f"ns=2;s=V{i}", "metric": f"v{i}"} for i in range(items)],
        })  # fmt: skip
        home = Path(tempfile.mkdtemp(prefix="fieldline-bench-opcua-"))
        module = OpcUaModule(spec, home=home, state_dir=home, default_uri="urn:fieldline:bench")
        counts = {"values": 0, "readings": 0}
        events: list[str] = []

        def emit(reading: dict[str, Any]) -> None:
            counts["readings"] += 1
            counts["values"] += len(reading["metrics"])

        await module.start(emit, lambda severity, kind, message, data: events.append(kind))
        started = time.monotonic()
        while counts["values"] < items and time.monotonic() - started < 30:  # noqa: ASYNC110
            await asyncio.sleep(0.1)  # the subscription's first full round
        await asyncio.sleep(2.0)  # warm-up
        v0, r0 = counts["values"], counts["readings"]
        c0, t0, w0 = time.process_time(), time.monotonic(), int(progress.read_text())
        await asyncio.sleep(seconds)
        cpu, wall = time.process_time() - c0, time.monotonic() - t0
        written = int(progress.read_text()) - w0
        values, readings = counts["values"] - v0, counts["readings"] - r0
        await module.stop()
    finally:
        child.terminate()
        child.wait(10)
    return {
        "items": items,
        "requested_values_per_s": items * rate,
        "server_wrote_values_per_s": round(written / wall),
        "values_per_s": round(values / wall),
        "readings_per_s": round(readings / wall, 1),
        "cpu_s_per_s": round(cpu / wall, 3),
        "cpu_us_per_value": round(cpu / values * 1e6, 1) if values else None,
        "publishing_interval_s": publishing,
        "events": events,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=1000, help="monitored items (1000)")
    parser.add_argument("--rate", type=float, default=10.0, help="updates per item per s (10)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds (10)")
    parser.add_argument("--publishing", type=float, default=0.1, help="publishing interval s")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--progress", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve, args.items, args.rate, args.progress))
        return
    result = asyncio.run(measure(args.items, args.rate, args.seconds, args.publishing))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
