"""Modbus register arithmetic, free of any I/O: values <-> 16-bit registers, and read plans.

A value is packed most significant byte first, cut into 16-bit words, then reordered:
`word_order = "little"` puts the least significant word first (the "CDAB" of many PLCs),
`byte_order = "little"` swaps the two bytes inside every word ("BADC"); both give "DCBA".
The engineering value is `raw * scale + offset`; a write runs that backwards.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

RegisterType = Literal["int16", "uint16", "int32", "uint32", "float32", "float64"]
Order = Literal["big", "little"]
Table = Literal["holding", "input", "coil", "discrete"]

REGISTER_TYPES: tuple[RegisterType, ...] = (
    "int16", "uint16", "int32", "uint32", "float32", "float64",
)  # fmt: skip
# registers each type takes, and its struct code (big-endian)
WIDTH: dict[RegisterType, int] = {
    "int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "float32": 2, "float64": 4,
}  # fmt: skip
_STRUCT: dict[RegisterType, str] = {
    "int16": ">h", "uint16": ">H", "int32": ">i", "uint32": ">I", "float32": ">f", "float64": ">d",
}  # fmt: skip
_INT_RANGE: dict[RegisterType, tuple[int, int]] = {
    "int16": (-(2**15), 2**15 - 1),
    "uint16": (0, 2**16 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "uint32": (0, 2**32 - 1),
}
_TYPES: dict[str, RegisterType] = {t: t for t in REGISTER_TYPES}
BIT_TABLES: tuple[Table, ...] = ("coil", "discrete")
WRITABLE_TABLES: tuple[Table, ...] = ("holding", "coil")
# Modbus function codes of the reads, per table
READ_FUNCTION: dict[Table, int] = {"coil": 1, "discrete": 2, "holding": 3, "input": 4}
# the protocol's most per read request (Modbus Application Protocol v1.1b3, 6.1-6.4)
MAX_READ_BITS = 2000
MAX_READ_REGISTERS = 125
MAX_ADDRESS = 65535


class RegisterError(ValueError):
    """A value does not fit its register type, or registers do not make a value."""


def is_float(kind: RegisterType) -> bool:
    """True for the IEEE 754 types (float32, float64)."""
    return kind.startswith("float")


def decode(
    registers: Sequence[int],
    kind: RegisterType,
    byte_order: Order = "big",
    word_order: Order = "big",
) -> int | float:
    """The raw value in `registers` (exactly WIDTH[kind] of them, each 0..65535)."""
    width = WIDTH[kind]
    if len(registers) != width:
        raise RegisterError(f"{kind} takes {width} register(s), got {len(registers)}")
    words = list(registers)
    if word_order == "little":
        words.reverse()
    try:
        data = b"".join(w.to_bytes(2, "little" if byte_order == "little" else "big") for w in words)
    except OverflowError:
        raise RegisterError(f"a register holds 0..65535, got {list(registers)}") from None
    value: int | float = struct.unpack(_STRUCT[kind], data)[0]
    return value


def encode(
    value: int | float,
    kind: RegisterType,
    byte_order: Order = "big",
    word_order: Order = "big",
) -> list[int]:
    """The registers holding raw `value` as `kind`; RegisterError if it does not fit."""
    if is_float(kind):
        try:
            data = struct.pack(_STRUCT[kind], float(value))
        except OverflowError:
            raise RegisterError(f"{value!r} is out of {kind} range") from None
    else:
        if isinstance(value, float):
            if not value.is_integer():
                raise RegisterError(f"{kind} holds whole numbers, not {value!r}")
            value = int(value)
        low, high = _INT_RANGE[kind]
        if not low <= value <= high:
            raise RegisterError(f"{value} is out of {kind} range {low}..{high}")
        data = struct.pack(_STRUCT[kind], value)
    words = [
        int.from_bytes(data[i : i + 2], "little" if byte_order == "little" else "big")
        for i in range(0, len(data), 2)
    ]
    if word_order == "little":
        words.reverse()
    return words


def to_engineering(raw: int | float, scale: float = 1.0, offset: float = 0.0) -> int | float:
    """`raw * scale + offset`; an integer stays an integer when there is nothing to scale."""
    if scale == 1.0 and offset == 0.0:
        return raw
    return raw * scale + offset


def to_raw(
    value: float, kind: RegisterType, scale: float = 1.0, offset: float = 0.0
) -> int | float:
    """The raw register value that reads back as engineering `value` (integers rounded)."""
    if not math.isfinite(value):
        raise RegisterError(f"cannot write {value!r}: not a finite number")
    raw = (value - offset) / scale
    if is_float(kind):
        return raw
    whole = round(raw)
    low, high = _INT_RANGE[kind]
    if not low <= whole <= high:
        lo, hi = sorted((low * scale + offset, high * scale + offset))
        raise RegisterError(f"{value:g} is outside what {kind} holds here ({lo:g}..{hi:g})")
    return whole


@dataclass(frozen=True)
class Span:
    """One point's place in the device: table, first address and how many registers/bits."""

    table: Table
    address: int
    count: int

    @property
    def end(self) -> int:
        """The address just past the span."""
        return self.address + self.count


@dataclass(frozen=True)
class ReadRequest:
    """One Modbus read covering the spans at `members` (indexes into the planned list)."""

    table: Table
    address: int
    count: int
    members: tuple[int, ...]

    @property
    def function(self) -> int:
        """The Modbus function code of the read (1 coils ... 4 input registers)."""
        return READ_FUNCTION[self.table]


def plan_reads(spans: Sequence[Span], max_gap: int = 0) -> list[ReadRequest]:
    """Group spans into as few reads as the protocol allows: spans of one table that touch,
    overlap or lie at most `max_gap` addresses apart share a read (the gap is read too)."""
    order = sorted(range(len(spans)), key=lambda i: (spans[i].table, spans[i].address))
    requests: list[ReadRequest] = []
    current: tuple[Table, int, int, list[int]] | None = None
    for i in order:
        span = spans[i]
        limit = MAX_READ_BITS if span.table in BIT_TABLES else MAX_READ_REGISTERS
        if current is not None:
            table, start, end, members = current
            new_end = max(end, span.end)
            if table == span.table and span.address <= end + max_gap and new_end - start <= limit:
                current = (table, start, new_end, [*members, i])
                continue
            requests.append(ReadRequest(table, start, end - start, tuple(members)))
        current = (span.table, span.address, span.end, [i])
    if current is not None:
        table, start, end, members = current
        requests.append(ReadRequest(table, start, end - start, tuple(members)))
    return requests


@dataclass(frozen=True)
class Layout:
    """Where one point lives and how its registers make a value (type None: a coil or input bit)."""

    table: Table
    address: int
    type: RegisterType | None = None
    byte_order: Order = "big"
    word_order: Order = "big"
    scale: float = 1.0
    offset: float = 0.0

    @property
    def span(self) -> Span:
        """The addresses the point occupies."""
        kind = self.type
        return Span(self.table, self.address, 1 if kind is None else WIDTH[kind])

    def value(self, words: Sequence[int] | Sequence[bool]) -> bool | int | float:
        """The engineering value of the point's registers (or its one bit); RegisterError when
        there are fewer words than the point spans (a short answer from the device)."""
        kind = self.type
        if len(words) < self.span.count:
            raise RegisterError(
                f"{self.table} {self.address}: {len(words)} of {self.span.count} "
                f"{'bit' if kind is None else 'register'}(s) in the answer"
            )
        if kind is None:
            return bool(words[0])
        raw = decode([int(w) for w in words], kind, self.byte_order, self.word_order)
        return to_engineering(raw, self.scale, self.offset)

    def registers_for(self, value: float) -> list[int]:
        """The registers that read back as engineering `value`; RegisterError if it cannot."""
        kind = self.type
        if kind is None:
            raise RegisterError(f"{self.table} {self.address} is a bit, not a register")
        return encode(to_raw(value, kind, self.scale, self.offset), kind, *self.orders)

    @property
    def orders(self) -> tuple[Order, Order]:
        """(byte_order, word_order)."""
        return self.byte_order, self.word_order


WRITE_COIL = "write-coil"
WRITE_REGISTER = "write-register"
WRITE_COMMANDS = (WRITE_COIL, WRITE_REGISTER)


class WriteArgsError(ValueError):
    """A write command's arguments do not name a writable point or value (one line)."""


@dataclass(frozen=True)
class Write:
    """A checked write: one coil (`bit`) or consecutive holding registers (`registers`)."""

    table: Table
    address: int
    bit: bool | None = None
    registers: tuple[int, ...] = ()
    text: str = ""


def parse_write(name: str, args: dict[str, object], points: dict[str, Layout]) -> Write:
    """Check `write-coil` / `write-register` arguments against a module's points.

    `write-coil`: `point` (a coil's metric) or `address`, and `value` (true/false).
    `write-register`: `point` (a holding register's metric; its type, orders, scale and
    offset encode `value`) or `address` (with `type`, default uint16, and the orders).
    """
    if name not in WRITE_COMMANDS:
        raise WriteArgsError(f"takes {' and '.join(WRITE_COMMANDS)}, not {name!r}")
    allowed = {"point", "address", "value"}
    if name == WRITE_REGISTER:
        allowed |= {"type", "byte_order", "word_order"}
    unknown = sorted(set(args) - allowed)
    if unknown:
        raise WriteArgsError(
            f"{name}: unknown argument {unknown[0]!r}; it takes {', '.join(sorted(allowed))}"
        )
    if ("point" in args) == ("address" in args):
        raise WriteArgsError(f"{name}: give either point (a metric name) or address")
    if "value" not in args:
        raise WriteArgsError(f"{name}: needs value")
    layout = _target(name, args, points)
    value = args["value"]
    if name == WRITE_COIL:
        if not isinstance(value, bool) and value not in (0, 1):
            raise WriteArgsError(f"{name}: value must be true or false, not {value!r}")
        bit = bool(value)
        return Write(
            "coil", layout.address, bit=bit, text=f"coil {layout.address} <- {str(bit).lower()}"
        )
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise WriteArgsError(f"{name}: value must be a number, not {value!r}")
    try:
        words = layout.registers_for(value)
    except RegisterError as exc:
        raise WriteArgsError(f"{name}: {exc}") from None
    where = (
        f"{layout.address}"
        if len(words) == 1
        else f"{layout.address}..{layout.address + len(words) - 1}"
    )
    return Write(
        "holding", layout.address, registers=tuple(words),
        text=f"holding {where} <- {value:g} ({layout.type})",
    )  # fmt: skip


def _target(name: str, args: dict[str, object], points: dict[str, Layout]) -> Layout:
    table: Table = "coil" if name == WRITE_COIL else "holding"
    if "point" in args:
        point = args["point"]
        layout = points.get(point) if isinstance(point, str) else None
        if layout is None:
            have = ", ".join(sorted(m for m, p in points.items() if p.table == table)) or "none"
            raise WriteArgsError(f"{name}: no point {point!r}; its {table} points: {have}")
        if layout.table != table:
            right = WRITE_COIL if layout.table == "coil" else WRITE_REGISTER
            hint = f"use {right}" if layout.table in WRITABLE_TABLES else "it is read-only"
            raise WriteArgsError(f"{name}: point {point!r} is a {layout.table} point; {hint}")
        for key in ("type", "byte_order", "word_order"):
            if key in args:
                raise WriteArgsError(f"{name}: {key} comes from point {point!r}; remove it")
        return layout
    address = args["address"]
    if isinstance(address, bool) or not isinstance(address, int) or not 0 <= address <= MAX_ADDRESS:
        raise WriteArgsError(f"{name}: address must be 0..{MAX_ADDRESS}, not {address!r}")
    if table == "coil":
        return Layout("coil", address)
    given = args.get("type", "uint16")
    kind = _TYPES.get(given) if isinstance(given, str) else None
    if kind is None:
        raise WriteArgsError(
            f"{name}: type must be one of {', '.join(REGISTER_TYPES)}, not {given!r}"
        )
    orders: list[Order] = []
    for key in ("byte_order", "word_order"):
        order = args.get(key, "big")
        if order not in ("big", "little"):
            raise WriteArgsError(f"{name}: {key} must be 'big' or 'little', not {order!r}")
        orders.append("little" if order == "little" else "big")
    layout = Layout("holding", address, kind, orders[0], orders[1])
    if layout.span.end - 1 > MAX_ADDRESS:
        raise WriteArgsError(f"{name}: {kind} at {address} runs past address {MAX_ADDRESS}")
    return layout
