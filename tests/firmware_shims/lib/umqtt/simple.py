"""umqtt.simple's public API for CPython, speaking real MQTT 3.1.1 over real TCP and TLS.

The same constructor, methods and behaviour as micropython-lib's umqtt.simple 1.5+ (written
here from its documented API and the MQTT 3.1.1 specification): blocking calls, QoS 0/1
publish that waits for its PUBACK while handing incoming PUBLISHes to the callback, packet
ids packed into 16 bits without wrapping (id 65536 goes out as 0, as MicroPython's struct
does), no automatic PINGREQ, `check_msg()` that reads one byte non-blocking, EOF reported as
`OSError(-1)`, a CONNACK refusal as `MQTTException(code)`. Streams keep MicroPython's
semantics: `read(n)` blocks for n bytes (fewer only at EOF) or returns None when non-blocking
and nothing is there; `setblocking(True)` clears a timeout.

Only the network's presence is simulated (`board.network_up()`); each connection is
registered with the board so a test can drop it the way a power cut or Wi-Fi loss would.
"""

from __future__ import annotations

import errno
import socket
import ssl as _cpython_ssl
import struct
from collections.abc import Callable
from typing import Any

from tests.firmware_shims import board as _board

__all__ = ["MQTTClient", "MQTTException"]

Data = bytes | bytearray | memoryview | str


class MQTTException(Exception):  # noqa: N818  (umqtt.simple's name)
    pass


def _bytes(value: Data) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


def _remaining_length(size: int) -> bytes:
    out = bytearray()
    while True:
        byte = size & 0x7F
        size >>= 7
        out.append(byte | 0x80 if size else byte)
        if not size:
            return bytes(out)


def _string(value: Data) -> bytes:
    data = _bytes(value)
    return struct.pack("!H", len(data)) + data


class _Stream:
    """A MicroPython stream over a CPython (TLS) socket."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        _board.BOARD.add_socket(sock)

    def read(self, n: int) -> bytes | None:
        _board.BOARD.check_power()
        if self._sock.gettimeout() == 0.0:
            try:
                return self._sock.recv(n)
            except (BlockingIOError, _cpython_ssl.SSLWantReadError, _cpython_ssl.SSLWantWriteError):
                return None
        data = bytearray()
        while len(data) < n:
            chunk = self._sock.recv(n - len(data))
            if not chunk:
                break
            data += chunk
        return bytes(data)

    def write(self, data: Data, length: int | None = None) -> int:
        _board.BOARD.check_power()
        payload = _bytes(data)
        if length is not None:
            payload = payload[:length]
        self._sock.sendall(payload)
        return len(payload)

    def setblocking(self, flag: bool) -> None:
        self._sock.setblocking(flag)

    def settimeout(self, value: float | None) -> None:
        self._sock.settimeout(value)

    def close(self) -> None:
        _board.BOARD.remove_socket(self._sock)
        self._sock.close()


class MQTTClient:
    def __init__(
        self,
        client_id: Data,
        server: str,
        port: int = 0,
        user: Data | None = None,
        password: Data | None = None,
        keepalive: int = 0,
        ssl: Any = None,
        ssl_params: dict[str, Any] | None = None,
    ) -> None:
        if port == 0:
            port = 8883 if ssl else 1883
        self.client_id = client_id
        self.sock: _Stream | None = None
        self.server = server
        self.port = port
        self.ssl = ssl
        self.ssl_params = ssl_params or {}
        self.pid = _board.BOARD.first_packet_id
        self.cb: Callable[[bytes, bytes], None] | None = None
        self.user = user
        self.pswd = password
        self.keepalive = keepalive
        self.lw_topic: Data | None = None
        self.lw_msg: Data | None = None
        self.lw_qos = 0
        self.lw_retain = False

    def _stream(self) -> _Stream:
        if self.sock is None:
            raise OSError(errno.ENOTCONN, "not connected")
        return self.sock

    def _read(self, n: int) -> bytes:
        data = self._stream().read(n)
        if data is None or len(data) < n:
            # MicroPython would index past the end here (IndexError); the firmware must cope
            # with any exception from a dead connection, so the plain OSError is no kinder.
            raise OSError(-1, "connection closed")
        return data

    def set_callback(self, f: Callable[[bytes, bytes], None]) -> None:
        self.cb = f

    def set_last_will(self, topic: Data, msg: Data, retain: bool = False, qos: int = 0) -> None:
        assert 0 <= qos <= 2
        assert topic
        self.lw_topic = topic
        self.lw_msg = msg
        self.lw_qos = qos
        self.lw_retain = retain

    def connect(self, clean_session: bool = True, timeout: float | None = None) -> int:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        board = _board.BOARD
        board.check_power()
        board.record("tcp-connect", f"{self.server}:{self.port}")
        try:
            return self._connect(clean_session, timeout)
        except Exception as exc:
            board.record("connect-failed", repr(exc))
            raise

    def _connect(self, clean_session: bool, timeout: float | None) -> int:
        board = _board.BOARD
        if not board.network_up():
            raise OSError(errno.EHOSTUNREACH, "EHOSTUNREACH")
        family, kind, proto, _name, address = socket.getaddrinfo(
            self.server, self.port, 0, socket.SOCK_STREAM
        )[0]
        raw = socket.socket(family, kind, proto)
        try:
            raw.settimeout(timeout)
            raw.connect(address)
            sock: socket.socket = raw
            if self.ssl is True:  # the legacy form: ssl=True, ssl_params for ssl.wrap_socket
                from tests.firmware_shims import mpssl

                sock = mpssl.wrap_socket(raw, **self.ssl_params)
            elif self.ssl:
                sock = self.ssl.wrap_socket(raw, server_hostname=self.server)
        except BaseException:
            raw.close()
            raise
        if self.ssl:
            board.record("tls", self.server)
        self.sock = _Stream(sock)

        flags = int(bool(clean_session)) << 1
        payload = _string(self.client_id)
        if self.lw_topic:
            assert self.lw_msg is not None
            flags |= 0x04 | (self.lw_qos & 0x03) << 3 | int(self.lw_retain) << 5
            payload += _string(self.lw_topic) + _string(self.lw_msg)
        if self.user:
            flags |= 0xC0
            payload += _string(self.user) + _string(self.pswd or b"")
        assert self.keepalive < 65536
        variable = b"\x00\x04MQTT\x04" + bytes([flags]) + struct.pack("!H", self.keepalive)
        body = variable + payload
        self.sock.write(b"\x10" + _remaining_length(len(body)) + body)
        resp = self._read(4)
        if resp[0] != 0x20 or resp[1] != 0x02:
            raise MQTTException(f"not a CONNACK: {resp!r}")
        if resp[3] != 0:
            raise MQTTException(resp[3])
        board.record("connack", _bytes(self.client_id).decode())
        return resp[2] & 1

    def disconnect(self) -> None:
        stream = self._stream()
        stream.write(b"\xe0\x00")
        stream.close()
        _board.BOARD.record("disconnect")

    def ping(self) -> None:
        self._stream().write(b"\xc0\x00")
        _board.BOARD.record("ping")

    def publish(self, topic: Data, msg: Data, retain: bool = False, qos: int = 0) -> None:
        topic_b, msg_b = _bytes(topic), _bytes(msg)
        size = 2 + len(topic_b) + len(msg_b) + (2 if qos > 0 else 0)
        assert size < 2097152
        packet = bytes([0x30 | qos << 1 | int(retain)]) + _remaining_length(size)
        packet += _string(topic_b)
        pid = 0
        if qos > 0:
            self.pid += 1
            pid = self.pid
            packet += struct.pack("!H", pid & 0xFFFF)
        self._stream().write(packet + msg_b)
        _board.BOARD.record("publish", f"{topic_b.decode()} qos={qos} pid={pid & 0xFFFF}")
        if qos == 1:
            while True:
                op = self.wait_msg()
                if op == 0x40:
                    size_byte = self._read(1)
                    assert size_byte == b"\x02"
                    rcv = self._read(2)
                    if pid == rcv[0] << 8 | rcv[1]:
                        return
        elif qos == 2:
            raise AssertionError("umqtt.simple does not publish at QoS 2")

    def _send_subunsub(self, topic: Data, kind: int, ack: int, ack_size: int, qos: int = 0) -> None:
        self.pid += 1
        pid = self.pid
        body = struct.pack("!H", pid & 0xFFFF) + _string(topic)
        if ack_size > 3:
            body += bytes([qos])
        self._stream().write(bytes([kind]) + _remaining_length(len(body)) + body)
        while True:
            op = self.wait_msg()
            if op == ack:
                resp = self._read(ack_size)
                assert resp[1] << 8 | resp[2] == pid
                if ack_size > 3 and resp[3] == 0x80:
                    raise MQTTException(resp[3])
                return

    def subscribe(self, topic: Data, qos: int = 0) -> None:
        assert self.cb is not None, "Subscribe callback is not set"
        self._send_subunsub(topic, 0x82, 0x90, 4, qos)
        _board.BOARD.record("subscribe", _bytes(topic).decode())

    def unsubscribe(self, topic: Data) -> None:
        self._send_subunsub(topic, 0xA2, 0xB0, 3)

    def wait_msg(self) -> int | None:
        """Handle one incoming packet: a PUBLISH goes to the callback (then its PUBACK is
        sent), a PINGRESP is swallowed; other packet types are returned for the caller."""
        stream = self._stream()
        res = stream.read(1)
        stream.setblocking(True)
        if res is None:
            return None
        if res == b"":
            raise OSError(-1)
        if res == b"\xd0":  # PINGRESP
            assert self._read(1)[0] == 0
            _board.BOARD.record("pingresp")
            return None
        op = res[0]
        if op & 0xF0 != 0x30:
            return op
        size = 0
        shift = 0
        while True:
            byte = self._read(1)[0]
            size |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
            shift += 7
        topic_len = self._read(2)
        length = topic_len[0] << 8 | topic_len[1]
        topic = self._read(length)
        size -= length + 2
        pid = 0
        if op & 6:
            raw_pid = self._read(2)
            pid = raw_pid[0] << 8 | raw_pid[1]
            size -= 2
        msg = self._read(size) if size else b""
        assert self.cb is not None, "a PUBLISH arrived and no callback is set"
        self.cb(topic, msg)
        if op & 6 == 2:
            stream.write(b"\x40\x02" + struct.pack("!H", pid))
        elif op & 6 == 4:
            raise AssertionError("umqtt.simple does not receive at QoS 2")
        return op

    def check_msg(self) -> int | None:
        self._stream().setblocking(False)
        return self.wait_msg()
