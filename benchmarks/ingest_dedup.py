"""Deduplicating per message instead of per row: the idempotent reference's modes side by side.

    python -m benchmarks.ingest_dedup                                        # ~7 min
    python -m benchmarks.ingest_dedup --messages 20000 --backlog-messages 2000 --rounds 2

The stack of `benchmarks.ingest` (Mosquitto with the rendered config and mutual TLS,
PostgreSQL + TimescaleDB, mosquitto_pub from 4 devices), in a home of its own. Each
`benchmarks.ingest_reference --dedup MODE` has its own MQTT session and its own schema, so
Mosquitto queues every message for each of them and they all drain the same backlog:

- `row`: `INSERT ... SELECT FROM unnest ... ON CONFLICT DO NOTHING` of every row;
- `message`: per batch, the messages' keys (device, boot, seq, ts) into a unique-keyed table
  with `ON CONFLICT DO NOTHING RETURNING`, then COPY of the new messages' rows, one transaction;
- `sample`: the same with one key per sample (what an outbox that re-batches needs);
- `none`: COPY of every row, no dedup (not idempotent: first drains only).

Each round, for single messages of 10 metrics (--messages) and for 100-sample messages
(--backlog-messages), in an order that rotates by round: a first drain (all rows new), then
a redelivery (the same payloads published again: all duplicates), then the first
--rekeyed messages per device again under other seq numbers (the same readings under new
keys, as an edge outbox re-batching its resend makes them: the keyed modes' COPY meets stored
rows and falls back to the row way). After every drain the row and key counts are checked
exactly; a lost or doubled row stops the run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import asyncpg

from benchmarks.ingest import (
    BASE_MS,
    METRICS,
    PUBLISHERS,
    REPO,
    Stack,
    _median,
    _reference,
    load,
    prepare_pki,
    start_stack,
    stop_stack,
)
from benchmarks.ingest import (
    publish as ingest_publish,
)
from certs import Role

MODES = ("row", "message", "sample", "none")
SAMPLES = 100  # per backlog message
REKEY = 10_000_000  # added to seq for the rekeyed resend: numbers no device used yet


def client_id(mode: str) -> str:
    """The MQTT session (and certificate) of one mode's reference."""
    return f"bench-ref-{mode}"


def schema(mode: str) -> str:
    """Where one mode's reference keeps its tables."""
    return f"dedup_{mode}"


# -- publishing: the backlogs of benchmarks.ingest, with boot and seq ---------------------------
def lines(tag: int, device: int, n: int, samples: int, first: int = 0, rekey: int = 0) -> bytes:
    """n payloads of one device, one per line: single messages of 10 metrics with seq and
    boot, or backlogs of `samples` samples, each sample with its seq. `rekey` shifts every
    seq (the same readings under other keys)."""
    base = BASE_MS + tag * 20_000_000 + device * 2_000_000  # benchmarks.ingest's layout
    out = []
    for i in range(first, first + n):
        if samples == 1:
            metrics = ",".join(f'"m{k}":{(i + k) % 1000}.5' for k in range(METRICS))
            out.append(
                f'{{"ts":{base + i},"seq":{i + rekey},"boot":{tag},"metrics":{{{metrics}}}}}'
            )
        else:
            start = base + i * samples
            body = ",".join(
                f'{{"ts":{start + s},"seq":{i * samples + s + rekey},'
                f'"metrics":{{"level":{(i + s) % 1000}.25}}}}'
                for s in range(samples)
            )
            out.append(f'{{"boot":{tag},"samples":[{body}]}}')
    return ("\n".join(out) + "\n").encode()


def publish(stack: Stack, tag: int, total: int, samples: int, rekey: int = 0) -> float:
    """benchmarks.ingest's publishers with these payloads; seconds taken."""

    def make(tag: int, device: int, n: int, samples: int, first: int) -> bytes:
        return lines(tag, device, n, samples, first, rekey)

    return ingest_publish(stack, tag, total, samples, make_lines=make)


# -- the references ----------------------------------------------------------------------------
def reference(stack: Stack, mode: str, messages: int) -> dict[str, Any]:
    """One mode's reference drains what its session holds: its JSON line, plus rows/s."""
    got = _reference(
        stack, messages, "--client", "lean", "--client-id", client_id(mode),
        "--schema", schema(mode), "--dedup", mode,
    )  # fmt: skip
    got["rows_per_s"] = got["rows"] / (got["finished_at"] - got["connected_at"])
    return got


def new_session(stack: Stack, mode: str) -> None:
    """A new, empty session for one mode (what Mosquitto queued for it is dropped)."""
    _reference(stack, 0, "--prepare-only", "--client-id", client_id(mode), "--schema", schema(mode))


async def counts(dsn: str, mode: str) -> tuple[int, int]:
    """(rows in the values table, keys in the key table) of one mode."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetchval(f"SELECT count(*) FROM {schema(mode)}.numeric_values")  # noqa: S608
        keys = await conn.fetchval(f"SELECT count(*) FROM {schema(mode)}.message_keys")  # noqa: S608
    finally:
        await conn.close()
    return int(rows), int(keys)


async def sizes(dsn: str, mode: str) -> tuple[int, int]:
    """(bytes of the values table, bytes of the key table), heap and indexes."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"VACUUM ANALYZE {schema(mode)}.message_keys")
        values = await conn.fetchval(f"SELECT hypertable_size('{schema(mode)}.numeric_values')")
        keys = await conn.fetchval(f"SELECT hypertable_size('{schema(mode)}.message_keys')")
    finally:
        await conn.close()
    return int(values or 0), int(keys or 0)


async def fingerprint(dsn: str, mode: str) -> tuple[Any, ...]:
    """What one mode stored, summed exactly: equal in every mode, or a reading went astray."""
    conn = await asyncpg.connect(dsn)
    try:
        sums = "count(*), sum(value::numeric), sum(extract(epoch FROM time)), count(DISTINCT time)"
        row = await conn.fetchrow(f"SELECT {sums} FROM {schema(mode)}.numeric_values")  # noqa: S608
    finally:
        await conn.close()
    assert row is not None
    return tuple(row)


class Books:
    """What each mode's tables must hold: every row and key once, never lost, never twice."""

    def __init__(self, stack: Stack, modes: list[str]) -> None:
        self.stack = stack
        self.rows = dict.fromkeys(modes, 0)
        self.keys = dict.fromkeys(modes, 0)

    def expect(self, mode: str, rows: int, keys: int) -> None:
        """Add what the drain just done must have stored, and check the tables hold exactly it."""
        self.rows[mode] += rows
        self.keys[mode] += keys
        got = asyncio.run(counts(self.stack.dsn, mode))
        want = (self.rows[mode], self.keys[mode])
        if got != want:
            raise SystemExit(
                f"{mode}: the tables hold {got[0]:,} rows and {got[1]:,} keys, "
                f"expected {want[0]:,} and {want[1]:,}: rows lost or doubled"
            )


def keys_of(mode: str, messages: int, samples: int) -> int:
    """How many keys `messages` messages of `samples` samples each leave in a mode's table."""
    return {"message": messages, "sample": messages * samples}.get(mode, 0)


def check(mode: str, got: dict[str, Any], inserted: int, new_keys: int, fallbacks: bool) -> None:
    """What the reference says it did: rows and keys taken, and whether COPY met a duplicate."""
    if got["inserted"] != inserted or got["new_keys"] != new_keys:
        raise SystemExit(
            f"{mode}: inserted {got['inserted']:,} rows and {got['new_keys']:,} keys, "
            f"expected {inserted:,} and {new_keys:,}"
        )
    if bool(got["fallbacks"]) != fallbacks:
        raise SystemExit(f"{mode}: {got['fallbacks']} batches fell back to the row way")


# -- the run -------------------------------------------------------------------------------------
def round_of(
    stack: Stack, books: Books, args: argparse.Namespace, order: list[str], kind: str
) -> dict[str, dict[str, float]]:
    """A first drain, a redelivery and a rekeyed resend of one backlog, by every mode in
    `order`: {phase: {mode: rows/s}}, each phase's figures printed with their ratios."""
    messages, samples = (args.messages, 1) if kind == "single" else (args.backlog_messages, SAMPLES)
    rows = messages * (METRICS if samples == 1 else samples)
    rekeyed = min(args.rekeyed, messages // PUBLISHERS) * PUBLISHERS
    tag = stack.next_tag()
    out: dict[str, dict[str, float]] = {"first": {}, "redelivery": {}, "rekeyed": {}}
    fallbacks: dict[str, int] = {}
    idempotent = [m for m in order if m != "none"]
    for phase in out:
        load_before = load()
        if phase in ("first", "redelivery"):  # the same payloads twice
            publish(stack, tag, messages, samples)
        else:
            # the first messages of each device again, each under new seq numbers
            publish(stack, tag, rekeyed, samples, rekey=REKEY)
        if phase != "first" and "none" in order:
            new_session(stack, "none")  # COPY alone is not idempotent: it skips these
        n = messages if phase != "rekeyed" else rekeyed
        for mode in order if phase == "first" else idempotent:
            got = reference(stack, mode, n)
            if got["rows"] != n * (rows // messages):
                raise SystemExit(f"{mode}: got {got['rows']:,} rows in {n:,} messages")
            keys = keys_of(mode, n, samples)
            if phase == "first":
                books.expect(mode, rows, keys)
                check(mode, got, rows, keys, fallbacks=False)
            elif phase == "redelivery":
                books.expect(mode, 0, 0)
                check(mode, got, 0, 0, fallbacks=False)
            else:
                books.expect(mode, 0, keys)
                check(mode, got, 0, keys, fallbacks=mode in ("message", "sample"))
            out[phase][mode] = got["rows_per_s"]
            fallbacks[mode] = got["fallbacks"]
        rates = out[phase]
        shown = [m for m in MODES if m in rates]
        print(
            f"  {kind} {phase:10} {n:,} msgs: "
            + ", ".join(f"{m} {rates[m]:,.0f}" for m in shown)
            + " rows/s; vs row: "
            + ", ".join(f"{m} {rates[m] / rates['row']:.2f}" for m in shown if m != "row")
            + (
                f"; batches fallen back: {', '.join(f'{m} {fallbacks[m]}' for m in idempotent)}"
                if phase == "rekeyed"
                else ""
            )
            + f" (load {load_before} -> {load()})",
            flush=True,
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=50_000, help="single messages per drain")
    parser.add_argument(
        "--backlog-messages", type=int, default=5_000, help="100-sample messages per drain"
    )
    parser.add_argument(
        "--rekeyed", type=int, default=250, help="messages per device resent under new keys"
    )
    parser.add_argument("--rounds", type=int, default=4, help="each mode runs in every position")
    parser.add_argument(
        "--modes", default=",".join(MODES), help=f"which of {', '.join(MODES)} (row is needed)"
    )
    parser.add_argument("--home", type=Path, default=REPO / ".fieldline" / "bench-ingest-dedup")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if "row" not in modes or not set(modes) <= set(MODES):
        parser.error(f"--modes: some of {', '.join(MODES)}, with row")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped by SIGTERM"))
    args.home.mkdir(parents=True, exist_ok=True)
    pki = prepare_pki(args.home)
    for mode in MODES:  # before start_stack renders Mosquitto's ACL, which names them
        if not (pki.root / "issued" / client_id(mode)).exists():
            pki.issue(client_id(mode), tenant="platform", role=Role.SERVICE)
    stack = start_stack(args.home)
    books = Books(stack, modes)
    runs: list[dict[str, Any]] = []
    results: dict[str, Any] = {"machine": f"{os.cpu_count()} cores", "runs": runs}
    try:
        for mode in modes:  # the sessions first, so that Mosquitto queues for each
            new_session(stack, mode)
        for round_ in range(args.rounds):
            order = modes[round_ % len(modes) :] + modes[: round_ % len(modes)]
            if round_ % 2:
                order.reverse()
            print(f"round {round_ + 1}, order {', '.join(order)}", flush=True)
            for kind in ("single", "backlog"):
                phases = round_of(stack, books, args, order, kind)
                runs.append({"round": round_ + 1, "kind": kind, **phases})
        prints = {mode: asyncio.run(fingerprint(stack.dsn, mode)) for mode in modes}
        if len(set(prints.values())) != 1:
            raise SystemExit(f"the modes stored different readings: {prints}")
        print(f"every mode stored the same readings (count, sums): {prints['row']}", flush=True)
        for mode in modes:
            values, keys = asyncio.run(sizes(stack.dsn, mode))
            results.setdefault("sizes", {})[mode] = {
                "rows": books.rows[mode], "values_bytes": values,
                "keys": books.keys[mode], "keys_bytes": keys,
            }  # fmt: skip
    finally:
        stop_stack(stack)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    _summary(results, modes)


def _summary(results: dict[str, Any], modes: list[str]) -> None:
    print("\nmedian ratio to row dedup over the rounds (each round's modes drained one backlog)")
    for kind in ("single", "backlog"):
        for phase in ("first", "redelivery", "rekeyed"):
            got = [r[phase] for r in results["runs"] if r["kind"] == kind]
            ratios = {
                m: [g[m] / g["row"] for g in got] for m in modes if m != "row" and m in got[0]
            }
            row = _median([g["row"] for g in got])
            print(
                f"  {kind:7} {phase:10} row {row:>9,.0f} rows/s; "
                + ", ".join(
                    f"{m} {_median(v):.2f} ({', '.join(f'{x:.2f}' for x in v)})"
                    for m, v in ratios.items()
                )
            )
    print("\nsizes after the run (hypertable_size: heap, indexes, TOAST)")
    for mode, s in results["sizes"].items():
        per_key = f"{s['keys_bytes'] / s['keys']:.0f} B per key" if s["keys"] else "no keys"
        print(
            f"  {mode:8} {s['rows']:>10,} rows {s['values_bytes'] / s['rows']:.0f} B per row; "
            f"{s['keys']:>10,} keys {per_key}"
        )


if __name__ == "__main__":
    main()
