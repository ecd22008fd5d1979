"""The bytes the broker writes and the CONNECT it reads, against amqtt's own codec."""

from __future__ import annotations

import asyncio
import struct

import pytest
from amqtt.adapters import BufferReader
from amqtt.mqtt.publish import PublishPacket
from hypothesis import given
from hypothesis import strategies as st

from broker import wire
from broker.errors import ProtocolError, UnsupportedProtocolError
from tests.mqtt_raw import connect_packet


@given(
    topic=st.text(min_size=1, max_size=40).filter(lambda t: not set(t) & {"\x00", "#", "+"}),
    payload=st.binary(max_size=300),
    qos=st.integers(0, 2),
    retain=st.booleans(),
    dup=st.booleans(),
    packet_id=st.integers(1, 65535),
)
def test_publish_decodes_with_amqtts_codec(
    topic: str, payload: bytes, qos: int, retain: bool, dup: bool, packet_id: int
) -> None:
    data = wire.publish(topic.encode(), payload, qos, retain, dup, packet_id if qos else 0)
    packet = asyncio.run(PublishPacket.from_stream(BufferReader(data)))
    assert packet.topic_name == topic
    assert packet.data == payload
    assert (packet.qos, packet.retain_flag, packet.dup_flag) == (qos, retain, dup)
    if qos:
        assert packet.packet_id == packet_id


@pytest.mark.parametrize("n", [0, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152, 268_435_455])
def test_varint_boundaries(n: int) -> None:
    encoded = wire.varint(n)
    assert len(encoded) == 1 + (n > 127) + (n > 16_383) + (n > 2_097_151)
    value = sum((b & 0x7F) << (7 * i) for i, b in enumerate(encoded))
    assert value == n


def test_connack_and_pubrel() -> None:
    assert wire.connack(True, wire.ACCEPTED) == b"\x20\x02\x01\x00"
    # session present is 0 whenever the connection is refused (MQTT-3.2.2-4)
    assert wire.connack(True, wire.NOT_AUTHORIZED) == b"\x20\x02\x00\x05"
    assert wire.pubrel(258) == b"\x62\x02\x01\x02"


def _read(data: bytes, max_size: int = 1024) -> wire.Connect:
    async def run() -> wire.Connect:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        return await wire.read_connect(reader, max_size)

    return asyncio.run(run())


def test_connect_fields() -> None:
    got = _read(
        connect_packet("dev-1", clean=False, keepalive=45, will=("fl/a/b/status", b"off", 1, True))
    )
    assert got == wire.Connect(
        "dev-1", False, 45, wire.Will("fl/a/b/status", b"off", 1, True), None, None
    )


def test_mqtt5_is_unsupported_even_before_the_rest_arrives() -> None:
    whole = connect_packet("dev-1", level=5)
    with pytest.raises(UnsupportedProtocolError, match="level 5"):
        _read(whole)

    async def partial() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(whole[:10])  # header, name and level only; the peer stalls here
        await asyncio.wait_for(wire.read_connect(reader, 1024), 1)

    with pytest.raises(UnsupportedProtocolError):
        asyncio.run(partial())


def _body(flags: int, payload: bytes, name: bytes = b"MQTT", level: int = 4) -> bytes:
    body = struct.pack("!H", len(name)) + name + bytes((level, flags)) + b"\x00\x3c" + payload
    return b"\x10" + wire.varint(len(body)) + body


def _s(text: bytes) -> bytes:
    return struct.pack("!H", len(text)) + text


BAD = [
    (b"\x30\x02\x00\x00", ProtocolError, "first packet must be CONNECT"),
    (_body(0x02, _s(b"x"), name=b"MQTX"), ProtocolError, "unknown protocol name"),
    (_body(0x02, _s(b"x"), name=b"MQIsdp", level=3), UnsupportedProtocolError, "level 3"),
    (_body(0x03, _s(b"x")), ProtocolError, "reserved CONNECT flag"),
    (_body(0x02 | 0x18, _s(b"x")), ProtocolError, "Will QoS 3"),
    (_body(0x02 | 0x20, _s(b"x")), ProtocolError, "without a Will"),
    (_body(0x02 | 0x40, _s(b"x") + _s(b"pw")), ProtocolError, "password without a user name"),
    (_body(0x02, _s(b"\xff\xfe")), ProtocolError, "client id is not valid UTF-8"),
    (_body(0x02, _s(b"a\x00b")), ProtocolError, "NUL"),
    (_body(0x02, _s(b"x") + b"junk"), ProtocolError, "bytes after the CONNECT payload"),
    (_body(0x02, struct.pack("!H", 50) + b"short"), ProtocolError, "shorter than its fields"),
    (b"\x10\xff\xff\xff\xff\x7f", ProtocolError, "malformed remaining length"),
]


@pytest.mark.parametrize(("data", "error", "text"), BAD)
def test_bad_connects(data: bytes, error: type[Exception], text: str) -> None:
    with pytest.raises(error, match=text):
        _read(data)


def test_connect_over_the_size_limit_is_refused_before_reading_it() -> None:
    with pytest.raises(ProtocolError, match="over the 100-byte limit"):
        _read(_body(0x02, _s(b"x" * 200)), max_size=100)


def test_truncated_connect_is_an_incomplete_read() -> None:
    with pytest.raises(asyncio.IncompleteReadError):
        _read(connect_packet("dev-1")[:-3])


def test_subscribe_and_unsubscribe_bodies() -> None:
    body = b"\x00\x05" + _s(b"fl/acme/dev-1/cmd/#") + b"\x01" + _s(b"fl/+/x") + b"\x02"
    assert wire.decode_subscribe(body) == (5, [("fl/acme/dev-1/cmd/#", 1), ("fl/+/x", 2)])
    assert wire.decode_unsubscribe(b"\x00\x06" + _s(b"a/b")) == (6, ["a/b"])


@pytest.mark.parametrize(
    ("body", "text"),
    [
        (b"\x00\x05", "without a topic filter"),
        (b"\x00\x05" + _s(b"a") + b"\x03", "requested QoS"),
        (b"\x00\x05" + _s(b"a") + b"\x81", "requested QoS"),
        (b"\x00\x05" + _s(b"\xc3\x28") + b"\x01", "not valid UTF-8"),
        (b"\x00\x05" + b"\x00\x09ab", "shorter than its fields"),
    ],
)
def test_bad_subscribes(body: bytes, text: str) -> None:
    with pytest.raises(ProtocolError, match=text):
        wire.decode_subscribe(body)


def test_bad_unsubscribes() -> None:
    with pytest.raises(ProtocolError, match="without a topic filter"):
        wire.decode_unsubscribe(b"\x00\x06")
    with pytest.raises(ProtocolError, match="not valid UTF-8"):
        wire.decode_unsubscribe(b"\x00\x06" + _s(b"\xff"))
