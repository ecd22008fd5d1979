"""The Modbus register codec, read plans and write arguments (edge_agent/registers.py)."""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pymodbus.client import ModbusTcpClient

from edge_agent.registers import (
    MAX_READ_BITS,
    MAX_READ_REGISTERS,
    REGISTER_TYPES,
    WIDTH,
    Layout,
    Order,
    RegisterError,
    RegisterType,
    Span,
    WriteArgsError,
    decode,
    encode,
    parse_write,
    plan_reads,
    to_engineering,
    to_raw,
)

ORDERS: list[Order] = ["big", "little"]
RANGES = {
    "int16": (-(2**15), 2**15 - 1),
    "uint16": (0, 2**16 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "uint32": (0, 2**32 - 1),
}


# the classic byte orders of a 32-bit value 0x42F6E979 (123.456 as float32):
# ABCD, CDAB (words swapped), BADC (bytes swapped), DCBA (both)
@pytest.mark.parametrize(
    ("byte_order", "word_order", "registers"),
    [
        ("big", "big", [0x42F6, 0xE979]),
        ("big", "little", [0xE979, 0x42F6]),
        ("little", "big", [0xF642, 0x79E9]),
        ("little", "little", [0x79E9, 0xF642]),
    ],
    ids=["ABCD", "CDAB", "BADC", "DCBA"],
)
def test_float32_in_each_byte_and_word_order(
    byte_order: Order, word_order: Order, registers: list[int]
) -> None:
    assert decode(registers, "float32", byte_order, word_order) == pytest.approx(123.456, abs=1e-4)
    assert encode(struct.unpack(">f", bytes.fromhex("42F6E979"))[0], "float32", byte_order,
                  word_order) == registers  # fmt: skip
    assert decode(registers, "uint32", byte_order, word_order) == 0x42F6E979


@pytest.mark.parametrize(
    ("kind", "registers", "value"),
    [
        ("int16", [0xFFFF], -1),
        ("uint16", [0xFFFF], 65535),
        ("int16", [0x8000], -32768),
        ("int32", [0xFFFF, 0xFFFE], -2),
        ("uint32", [0x1234, 0x5678], 0x12345678),
        ("float64", [0x3FF0, 0, 0, 0], 1.0),
        ("float64", [0xC000, 0, 0, 0], -2.0),
    ],
)
def test_known_values_big_endian(kind: RegisterType, registers: list[int], value: float) -> None:
    assert decode(registers, kind) == value
    assert encode(value, kind) == registers


def test_float64_word_order_little_reverses_all_four_words() -> None:
    assert encode(1.0, "float64", word_order="little") == [0, 0, 0, 0x3FF0]
    assert decode([0, 0, 0, 0x3FF0], "float64", word_order="little") == 1.0


def test_int16_byte_order_little_swaps_the_bytes() -> None:
    assert encode(0x1234, "uint16", byte_order="little") == [0x3412]
    assert decode([0x3412], "uint16", byte_order="little") == 0x1234


@pytest.mark.parametrize(
    ("value", "kind", "words"),
    [
        (70000, "int16", "out of int16 range"),
        (-1, "uint16", "out of uint16 range"),
        (2**32, "uint32", "out of uint32 range"),
        (1.5, "int32", "whole numbers"),
        (1e39, "float32", "out of float32 range"),
    ],
)
def test_values_that_do_not_fit_are_refused(value: float, kind: RegisterType, words: str) -> None:
    with pytest.raises(RegisterError, match=words):
        encode(value, kind)


def test_decode_wants_the_type_s_width_and_16_bit_registers() -> None:
    with pytest.raises(RegisterError, match="takes 2 register"):
        decode([1], "float32")
    with pytest.raises(RegisterError, match=r"0\.\.65535"):
        decode([70000], "uint16")


@given(
    kind=st.sampled_from(["int16", "uint16", "int32", "uint32"]),
    byte_order=st.sampled_from(ORDERS),
    word_order=st.sampled_from(ORDERS),
    data=st.data(),
)
def test_integers_round_trip(
    kind: RegisterType, byte_order: Order, word_order: Order, data: st.DataObject
) -> None:
    low, high = RANGES[kind]
    value = data.draw(st.integers(low, high))
    registers = encode(value, kind, byte_order, word_order)
    assert len(registers) == WIDTH[kind]
    assert all(0 <= r <= 0xFFFF for r in registers)
    assert decode(registers, kind, byte_order, word_order) == value


@given(
    value=st.floats(width=32, allow_nan=False),
    byte_order=st.sampled_from(ORDERS),
    word_order=st.sampled_from(ORDERS),
)
def test_float32_round_trips(value: float, byte_order: Order, word_order: Order) -> None:
    assert decode(encode(value, "float32", byte_order, word_order), "float32", byte_order,
                  word_order) == value  # fmt: skip


@given(
    value=st.floats(allow_nan=False),
    byte_order=st.sampled_from(ORDERS),
    word_order=st.sampled_from(ORDERS),
)
def test_float64_round_trips(value: float, byte_order: Order, word_order: Order) -> None:
    assert decode(encode(value, "float64", byte_order, word_order), "float64", byte_order,
                  word_order) == value  # fmt: skip


@given(
    kind=st.sampled_from(REGISTER_TYPES),
    word_order=st.sampled_from(ORDERS),
    registers=st.lists(st.integers(0, 0xFFFF), min_size=4, max_size=4),
)
def test_big_byte_order_agrees_with_pymodbus(
    kind: RegisterType, word_order: Order, registers: list[int]
) -> None:
    """An independent implementation: pymodbus's own converter (big-endian bytes only)."""
    words = registers[: WIDTH[kind]]
    datatype = getattr(ModbusTcpClient.DATATYPE, kind.upper())
    theirs = ModbusTcpClient.convert_from_registers(words, datatype, word_order=word_order)
    ours = decode(words, kind, "big", word_order)
    assert isinstance(theirs, int | float)
    assert (math.isnan(ours) and math.isnan(theirs)) or ours == theirs


def test_scale_and_offset_both_ways() -> None:
    assert to_engineering(215, 0.1) == pytest.approx(21.5)
    assert to_engineering(100, 2.0, -40.0) == 160.0
    assert to_engineering(7) == 7
    assert isinstance(to_engineering(7), int)
    assert to_raw(21.5, "int16", 0.1) == 215
    assert to_raw(160.0, "uint16", 2.0, -40.0) == 100
    assert to_raw(1.25, "float32", 0.5) == 2.5
    with pytest.raises(RegisterError, match=r"-3276.8..3276.7"):
        to_raw(5000.0, "int16", 0.1)
    with pytest.raises(RegisterError, match="finite"):
        to_raw(math.inf, "float32")


@given(raw=st.integers(-(2**15), 2**15 - 1), scale=st.sampled_from([0.1, 0.01, 2.0, -0.5]))
def test_a_scaled_int16_written_reads_back_as_written(raw: int, scale: float) -> None:
    layout = Layout("holding", 10, "int16", scale=scale, offset=3.0)
    value = layout.value([encode(raw, "int16")[0]])
    assert layout.registers_for(float(value)) == encode(raw, "int16")


def test_layout_decodes_bits_as_booleans_and_registers_with_scale() -> None:
    assert Layout("coil", 3).value([True]) is True
    assert Layout("discrete", 3).value([False]) is False
    assert Layout("coil", 3).span == Span("coil", 3, 1)
    temp = Layout("holding", 0, "float32", word_order="little")
    assert temp.span == Span("holding", 0, 2)
    assert temp.value(encode(21.5, "float32", word_order="little")) == 21.5


# --- read plans ----------------------------------------------------------------------------


def test_adjacent_points_of_a_table_share_one_read() -> None:
    spans = [
        Span("holding", 0, 2),  # float32
        Span("holding", 2, 1),
        Span("holding", 3, 4),  # float64
        Span("input", 0, 1),
        Span("coil", 0, 1),
        Span("coil", 1, 1),
        Span("holding", 100, 1),
    ]
    plan = plan_reads(spans)
    shapes = {(r.table, r.address, r.count): r.members for r in plan}
    assert shapes == {
        ("coil", 0, 2): (4, 5),
        ("holding", 0, 7): (0, 1, 2),
        ("holding", 100, 1): (6,),
        ("input", 0, 1): (3,),
    }
    assert {r.table: r.function for r in plan} == {"coil": 1, "holding": 3, "input": 4}


def test_a_gap_is_read_through_only_when_allowed() -> None:
    spans = [Span("holding", 0, 1), Span("holding", 5, 1)]
    assert len(plan_reads(spans)) == 2
    (one,) = plan_reads(spans, max_gap=4)
    assert (one.address, one.count, one.members) == (0, 6, (0, 1))
    assert len(plan_reads(spans, max_gap=3)) == 2


def test_overlapping_points_share_a_read() -> None:
    # the same register read as uint16 and as the high word of a uint32
    (one,) = plan_reads([Span("input", 10, 2), Span("input", 10, 1)])
    assert (one.address, one.count) == (10, 2)
    assert sorted(one.members) == [0, 1]


def test_reads_stay_within_the_protocol_s_limits() -> None:
    registers = [Span("holding", a, 2) for a in range(0, 400, 2)]
    plan = plan_reads(registers)
    assert max(r.count for r in plan) <= MAX_READ_REGISTERS
    assert sorted(i for r in plan for i in r.members) == list(range(len(registers)))
    bits = [Span("coil", a, 1) for a in range(5000)]
    plan = plan_reads(bits)
    assert [r.count for r in plan] == [MAX_READ_BITS, MAX_READ_BITS, 1000]


@given(
    st.lists(
        st.tuples(st.sampled_from(["holding", "input", "coil"]), st.integers(0, 300),
                  st.sampled_from([1, 2, 4])),
        min_size=1, max_size=60,
    ),
    st.integers(0, 10),
)  # fmt: skip
def test_every_point_is_inside_exactly_one_read(
    shapes: list[tuple[str, int, int]], gap: int
) -> None:
    spans = [Span(t, a, 1 if t == "coil" else n) for t, a, n in shapes]  # type: ignore[arg-type]
    plan = plan_reads(spans, gap)
    seen = sorted(i for r in plan for i in r.members)
    assert seen == list(range(len(spans)))
    for request in plan:
        limit = MAX_READ_BITS if request.table == "coil" else MAX_READ_REGISTERS
        assert request.count <= limit
        for i in request.members:
            span = spans[i]
            assert span.table == request.table
            assert request.address <= span.address
            assert span.end <= request.address + request.count


# --- write commands ------------------------------------------------------------------------

POINTS = {
    "setpoint": Layout("holding", 10, "float32", word_order="little"),
    "speed": Layout("holding", 12, "int16", scale=0.1),
    "heater": Layout("coil", 0),
    "temperature": Layout("input", 0, "float32"),
    "door": Layout("discrete", 0),
}


def test_write_register_encodes_with_the_point_s_type_orders_and_scale() -> None:
    write = parse_write("write-register", {"point": "setpoint", "value": 21.5}, POINTS)
    assert (write.table, write.address) == ("holding", 10)
    assert list(write.registers) == encode(21.5, "float32", word_order="little")
    speed = parse_write("write-register", {"point": "speed", "value": -12.3}, POINTS)
    assert list(speed.registers) == encode(-123, "int16")
    raw = parse_write("write-register", {"address": 40, "value": 7, "type": "uint32"}, POINTS)
    assert (raw.address, list(raw.registers)) == (40, [0, 7])
    assert "holding 40..41" in raw.text


def test_write_coil_by_point_or_address() -> None:
    on = parse_write("write-coil", {"point": "heater", "value": True}, POINTS)
    assert (on.table, on.address, on.bit) == ("coil", 0, True)
    off = parse_write("write-coil", {"address": 17, "value": 0}, POINTS)
    assert (off.address, off.bit) == (17, False)


@pytest.mark.parametrize(
    ("name", "args", "words"),
    [
        ("write-coil", {"point": "setpoint", "value": True}, "holding point; use write-register"),
        ("write-register", {"point": "heater", "value": 1}, "coil point; use write-coil"),
        ("write-register", {"point": "temperature", "value": 1}, "read-only"),
        ("write-coil", {"point": "door", "value": True}, "read-only"),
        ("write-coil", {"point": "nope", "value": True}, "its coil points: heater"),
        ("write-coil", {"value": True}, "either point"),
        ("write-coil", {"point": "heater", "address": 0, "value": True}, "either point"),
        ("write-coil", {"point": "heater"}, "needs value"),
        ("write-coil", {"point": "heater", "value": "on"}, "true or false"),
        ("write-register", {"point": "speed", "value": 4000}, "outside what int16 holds"),
        ("write-register", {"point": "speed", "value": True}, "must be a number"),
        ("write-register", {"address": 70000, "value": 1}, "0..65535"),
        ("write-register", {"address": 65535, "value": 1, "type": "float32"}, "runs past"),
        ("write-register", {"address": 1, "value": 1, "type": "float16"}, "type must be one of"),
        ("write-register", {"address": 1, "value": 1, "word_order": "middle"}, "'big' or 'little'"),
        ("write-register", {"point": "speed", "value": 1, "type": "int32"}, "comes from point"),
        ("write-register", {"point": "speed", "value": 1, "force": True}, "unknown argument"),
        ("reset", {}, "takes write-coil and write-register"),
    ],
)
def test_bad_write_arguments_are_one_clear_line(
    name: str, args: dict[str, object], words: str
) -> None:
    with pytest.raises(WriteArgsError) as caught:
        parse_write(name, args, POINTS)
    assert words in str(caught.value)
    assert "\n" not in str(caught.value)
