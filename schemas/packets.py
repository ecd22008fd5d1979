"""MQTT's own encodings, the one place fieldline writes them: the remaining length, strings,
and the packets several parts build (the broker's PUBLISH, a client's CONNECT and SUBSCRIBE).
"""

from __future__ import annotations

import struct

U16 = struct.Struct("!H")
MAX_REMAINING_LENGTH = 268_435_455  # what four varint bytes hold (MQTT 2.2.3)


def varint(n: int) -> bytes:
    """The remaining-length encoding (1 to 4 bytes)."""
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def string(value: str | bytes) -> bytes:
    """A UTF-8 string (or binary data) with its 16-bit length (MQTT 1.5.3)."""
    raw = value.encode("utf-8") if isinstance(value, str) else value
    return U16.pack(len(raw)) + raw


def publish(
    topic: bytes, payload: bytes, qos: int, retain: bool, dup: bool = False, packet_id: int = 0
) -> bytes:
    """A PUBLISH packet; `topic` is already UTF-8 encoded (it is shared by every subscriber)."""
    flags = 0x30 | (qos << 1) | (0x01 if retain else 0) | (0x08 if dup else 0)
    head = U16.pack(len(topic)) + topic
    if qos:
        head += U16.pack(packet_id)
    return bytes((flags,)) + varint(len(head) + len(payload)) + head + payload


def connect_v311(client_id: str, keepalive: int, clean: bool = True) -> bytes:
    """A minimal MQTT 3.1.1 CONNECT: no Will, no credentials (certificates authenticate)."""
    body = string("MQTT") + bytes((4, 0x02 if clean else 0)) + U16.pack(keepalive)
    body += string(client_id)
    return b"\x10" + varint(len(body)) + body


def subscribe_v311(packet_id: int, topic_filter: str, qos: int) -> bytes:
    """An MQTT 3.1.1 SUBSCRIBE of one filter."""
    body = U16.pack(packet_id) + string(topic_filter) + bytes((qos,))
    return b"\x82" + varint(len(body)) + body
