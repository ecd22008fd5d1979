"""MQTT 3.1.1 packets as the broker reads and writes them.

amqtt's codec reads a CONNECT with the 3.1.1 layout whatever its protocol level, so an MQTT 5
CONNECT is misparsed and never answered; reading the protocol name and level first lets the
broker answer CONNACK 0x01 and close. The other packets are encoded here because the broker
writes them straight to the transport, and decoded in place by broker.connection.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass

from broker.errors import ProtocolError, UnsupportedProtocolError

# the encodings live in schemas.packets; the broker's callers find them here too
from schemas.packets import publish as publish
from schemas.packets import varint as varint

CONNECT = 0x10
CONNACK = 0x20
PUBLISH = 0x30
PUBREL = 0x62  # type 6 with the reserved flags 0010

PROTOCOL_LEVEL = 4
# CONNACK return codes (MQTT 3.1.1, 3.2.2.3)
ACCEPTED = 0x00
UNACCEPTABLE_PROTOCOL = 0x01
IDENTIFIER_REJECTED = 0x02
SERVER_UNAVAILABLE = 0x03
BAD_CREDENTIALS = 0x04
NOT_AUTHORIZED = 0x05

_U16 = struct.Struct("!H")


def connack(session_present: bool, return_code: int) -> bytes:
    return bytes((CONNACK, 2, 1 if session_present and return_code == ACCEPTED else 0, return_code))


def pubrel(packet_id: int) -> bytes:
    return bytes((PUBREL, 2)) + _U16.pack(packet_id)


def suback(packet_id: int, return_codes: list[int]) -> bytes:
    """SUBACK: one return code per filter, in order (granted QoS, or 0x80)."""
    return (
        bytes((0x90,)) + varint(2 + len(return_codes)) + _U16.pack(packet_id) + bytes(return_codes)
    )


def unsuback(packet_id: int) -> bytes:
    return b"\xb0\x02" + _U16.pack(packet_id)


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass(frozen=True, slots=True)
class Connect:
    """A decoded MQTT 3.1.1 CONNECT."""

    client_id: str
    clean_session: bool
    keepalive: int
    will: Will | None
    username: str | None
    password: bytes | None


async def read_connect(reader: asyncio.StreamReader, max_size: int) -> Connect:
    """Read the first packet, which must be a CONNECT of at most max_size bytes, and decode it.

    Raises UnsupportedProtocolError (answer CONNACK 0x01), ProtocolError (close without an
    answer), or asyncio.IncompleteReadError when the peer goes away mid-packet.
    """
    first = (await reader.readexactly(1))[0]
    if first != CONNECT:
        raise ProtocolError(f"the first packet must be CONNECT, got type {first >> 4}")
    length = await _read_varint(reader)
    if length > max_size:
        raise ProtocolError(f"CONNECT of {length} bytes is over the {max_size}-byte limit")
    if length < 10:
        raise ProtocolError(f"a CONNECT of {length} bytes is too short")
    # The protocol name and level first: an MQTT 5 client is answered even if the rest of
    # its CONNECT (laid out differently) never arrives.
    head = await reader.readexactly(2)
    name_length = _U16.unpack(head)[0]
    if name_length > 6:
        raise ProtocolError("unknown protocol name")
    head += await reader.readexactly(name_length + 1)
    _check_protocol(head[2:-1], head[-1])
    return decode_connect(head + await reader.readexactly(length - len(head)))


def _check_protocol(name: bytes, level: int) -> None:
    if name not in (b"MQTT", b"MQIsdp"):
        raise ProtocolError(f"unknown protocol name {name[:16]!r}")
    if name != b"MQTT" or level != PROTOCOL_LEVEL:
        raise UnsupportedProtocolError(name.decode("ascii", "replace"), level)


async def _read_varint(reader: asyncio.StreamReader) -> int:
    value, shift = 0, 0
    for _ in range(4):
        byte = (await reader.readexactly(1))[0]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value
        shift += 7
    raise ProtocolError("malformed remaining length")


class _Cursor:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise ProtocolError("CONNECT is shorter than its fields say")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def u16(self) -> int:
        return int(_U16.unpack(self.take(2))[0])

    def blob(self) -> bytes:
        return self.take(self.u16())

    def text(self, what: str) -> str:
        raw = self.blob()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError(f"the {what} is not valid UTF-8") from exc
        if "\x00" in text:
            raise ProtocolError(f"the {what} contains a NUL character")
        return text


def decode_connect(body: bytes) -> Connect:
    """Decode the variable header and payload of a CONNECT (MQTT 3.1.1, section 3.1)."""
    cur = _Cursor(body)
    _check_protocol(cur.blob(), cur.take(1)[0])
    flags = cur.take(1)[0]
    keepalive = cur.u16()
    if flags & 0x01:
        raise ProtocolError("the reserved CONNECT flag is set")
    will_flag, will_qos, will_retain = bool(flags & 0x04), (flags >> 3) & 0x03, bool(flags & 0x20)
    has_user, has_password = bool(flags & 0x80), bool(flags & 0x40)
    if will_qos == 3:
        raise ProtocolError("Will QoS 3 is not a QoS")
    if not will_flag and (will_qos or will_retain):
        raise ProtocolError("Will QoS or retain set without a Will")
    if has_password and not has_user:
        raise ProtocolError("a password without a user name")
    client_id = cur.text("client id")
    will = None
    if will_flag:
        will = Will(cur.text("Will topic"), cur.blob(), will_qos, will_retain)
    username = cur.text("user name") if has_user else None
    password = cur.blob() if has_password else None
    if cur.pos != len(body):
        raise ProtocolError(f"{len(body) - cur.pos} bytes after the CONNECT payload")
    return Connect(client_id, bool(flags & 0x02), keepalive, will, username, password)


def decode_subscribe(body: bytes) -> tuple[int, list[tuple[str, int]]]:
    """SUBSCRIBE's packet id and (filter, requested QoS) pairs (MQTT 3.1.1, 3.8)."""
    cur = _Cursor(body)
    packet_id = cur.u16()
    pairs = []
    while cur.pos < len(body):
        topic_filter = cur.text("topic filter")
        options = cur.take(1)[0]
        if options > 2:
            raise ProtocolError(f"requested QoS byte {options:#x} (MQTT-3-8.3-4)")
        pairs.append((topic_filter, options))
    if not pairs:
        raise ProtocolError("a SUBSCRIBE without a topic filter (MQTT-3.8.3-3)")
    return packet_id, pairs


def decode_unsubscribe(body: bytes) -> tuple[int, list[str]]:
    """UNSUBSCRIBE's packet id and filters (MQTT 3.1.1, 3.10)."""
    cur = _Cursor(body)
    packet_id = cur.u16()
    filters = []
    while cur.pos < len(body):
        filters.append(cur.text("topic filter"))
    if not filters:
        raise ProtocolError("an UNSUBSCRIBE without a topic filter (MQTT-3.10.3-2)")
    return packet_id, filters
