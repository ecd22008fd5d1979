"""The worker's telemetry decode alone (`ingest_worker.decode.decode_message`), µs per message:
the fast path (`schemas.messages.fast_telemetry`) against the pydantic path, in one process.

    python -m benchmarks.decode                 # ~20 s
    python -m benchmarks.decode --rounds 9 --seconds 0.5

The two variants alternate in every round (this machine's CPU speed varies from minute to
minute), each timed for about --seconds; the median and the best (least disturbed) round
are printed. "pydantic" is the same function with the fast path turned off, i.e. the
decode of before the fast path.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from unittest import mock

from ingest_worker import decode as decode_module
from ingest_worker.decode import decode_message
from schemas.limits import DEFAULT_LIMITS
from schemas.messages import fast_telemetry

TOPIC = "fl/acme/dev-1/telemetry"


def payloads() -> dict[str, bytes]:
    """The shapes measured: single messages of 5, 10 (benchmarks.ingest's) and 100 metrics,
    and benchmarks.ingest's backlog message of 100 one-metric samples."""
    now = int(time.time() * 1000) - 60_000

    def single(n: int) -> bytes:
        metrics = {f"m{k}": (k * 37) % 1000 + 0.5 for k in range(n)}
        return json.dumps({"ts": now, "seq": 41, "metrics": metrics}).encode()

    backlog = {"samples": [{"ts": now + s, "metrics": {"level": s + 0.25}} for s in range(100)]}
    return {
        "5 metrics": single(5),
        "10 metrics": single(10),
        "100 metrics": single(100),
        "100 samples x 1": json.dumps(backlog).encode(),
    }


def per_message(payload: bytes, seconds: float) -> float:
    """µs of decode_message per message, over about `seconds`."""
    n, start = 0, time.perf_counter()
    while True:
        for _ in range(50):
            decode_message(None, TOPIC, payload, time.time(), DEFAULT_LIMITS)
        n += 50
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return elapsed / n * 1e6


def _not_sure(*_args: object, **_kwargs: object) -> None:
    """The fast path turned off (a plain function: a Mock's call costs ~10 µs)."""


def main() -> None:
    """Print µs/message, fast path against pydantic path, per payload shape."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=0.4, help="per variant and round")
    args = parser.parse_args()

    def pydantic_path(payload: bytes) -> float:
        with mock.patch.object(decode_module, "fast_telemetry", new=_not_sure):
            return per_message(payload, args.seconds)

    variants: dict[str, Callable[[bytes], float]] = {
        "fast": lambda p: per_message(p, args.seconds),
        "pydantic": pydantic_path,
    }
    for name, payload in payloads().items():
        assert fast_telemetry(payload, limits=DEFAULT_LIMITS) is not None
        times: dict[str, list[float]] = {v: [] for v in variants}
        for r in range(args.rounds):
            order = list(variants) if r % 2 == 0 else list(reversed(variants))
            for v in order:
                times[v].append(variants[v](payload))
        fast, slow = statistics.median(times["fast"]), statistics.median(times["pydantic"])
        # The fastest round is the one least disturbed by the other processes.
        fast_min, slow_min = min(times["fast"]), min(times["pydantic"])
        print(
            f"{name:>16} ({len(payload):>5} B): median pydantic {slow:6.1f} µs/msg, "
            f"fast {fast:6.1f}, {slow / fast:3.1f}x; best round {slow_min:6.1f} vs "
            f"{fast_min:6.1f}, {slow_min / fast_min:3.1f}x  "
            f"(rounds: pydantic {_fmt(times['pydantic'])}; fast {_fmt(times['fast'])})"
        )


def _fmt(values: list[float]) -> str:
    return ", ".join(f"{v:.1f}" for v in values)


if __name__ == "__main__":
    main()
