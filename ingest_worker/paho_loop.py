"""paho-mqtt driven by an asyncio event loop: no network thread.

The way Home Assistant drives paho: paho's public socket callbacks (`on_socket_open`,
`on_socket_close`, `on_socket_register_write`, `on_socket_unregister_write`) put its socket in
the loop's selector, which calls `loop_read()` / `loop_write()`; a timer calls `loop_misc()`
(keepalive) once a second. Callbacks such as `on_message` then run on the loop's thread.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode

# packets read in one selector callback before other callbacks get a turn
READ_BURST = 256
MISC_INTERVAL = 1.0


class PahoLoop:
    """Drives one `paho.mqtt.client.Client` on `loop`; reading can be paused.

    While paused the socket is not read and the keepalive is not judged (the silence is ours);
    after `resume()` it is judged again only after one keepalive, as the lean client does.
    """

    def __init__(
        self, client: mqtt.Client, loop: asyncio.AbstractEventLoop, keepalive: float
    ) -> None:
        self.client = client
        self.loop = loop
        self.keepalive = keepalive
        self.paused = False
        self._fd: int | None = None
        self._sock: Any = None
        self._misc: asyncio.TimerHandle | None = None
        self._judge_after = 0.0
        self._thread = threading.get_ident()
        client.on_socket_open = self._on_open
        client.on_socket_close = self._on_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write

    # paho calls these from `reconnect()`, which blocks and so runs in a worker thread, and
    # from the loop's thread afterwards: selector changes are always made on the loop
    def _on_loop(self, fn: Callable[..., None], *args: Any) -> None:
        if threading.get_ident() == self._thread:
            fn(*args)
        else:
            self.loop.call_soon_threadsafe(fn, *args)

    def _on_open(self, _c: Any, _u: Any, sock: Any) -> None:
        self._on_loop(self._opened, sock)

    def _on_close(self, _c: Any, _u: Any, sock: Any) -> None:
        self._on_loop(self._closed, sock)

    def _on_register_write(self, _c: Any, _u: Any, sock: Any) -> None:
        self._on_loop(self._want_write, sock, True)

    def _on_unregister_write(self, _c: Any, _u: Any, sock: Any) -> None:
        self._on_loop(self._want_write, sock, False)

    def _opened(self, sock: Any) -> None:
        self._sock, self._fd = sock, sock.fileno()
        if not self.paused:
            self.loop.add_reader(self._fd, self._read)
        self._misc = self.loop.call_later(MISC_INTERVAL, self._tick)

    def _closed(self, sock: Any) -> None:
        if sock is not self._sock or self._fd is None:
            return
        self.loop.remove_reader(self._fd)
        self.loop.remove_writer(self._fd)
        self._sock, self._fd = None, None
        if self._misc is not None:
            self._misc.cancel()
            self._misc = None

    def _want_write(self, sock: Any, on: bool) -> None:
        if sock is not self._sock or self._fd is None:
            return
        if on:
            self.loop.add_writer(self._fd, self._write)
        else:
            self.loop.remove_writer(self._fd)

    def _read(self) -> None:
        if self.paused or self._fd is None:
            return  # a turn scheduled before a pause or a close
        for _ in range(READ_BURST):
            # one packet per call (paho ignores loop_read's max_packets for QoS 1 input)
            if self.client.loop_read() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return  # paho has closed the socket and called on_disconnect
            sock = self.client.socket()
            if self.paused or sock is None:
                return
            # TLS: the rest of a record already decrypted is in the SSL object, not in the
            # kernel, so the selector would not call us for it
            if not isinstance(sock, ssl.SSLSocket) or not sock.pending():
                return
        self.loop.call_soon(self._read)

    def _write(self) -> None:
        self.client.loop_write()  # unregisters the writer itself once nothing is left

    def _tick(self) -> None:
        self._misc = None
        if self._fd is None:
            return
        judge = not self.paused and self.loop.time() >= self._judge_after
        if judge and self.client.loop_misc() != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return  # connection lost: paho has closed the socket
        if self._fd is not None and self._misc is None:
            self._misc = self.loop.call_later(MISC_INTERVAL, self._tick)

    def pause(self) -> None:
        """Stop reading the socket (writes, acknowledgements among them, go on)."""
        if self.paused:
            return
        self.paused = True
        if self._fd is not None:
            self.loop.remove_reader(self._fd)

    def resume(self) -> None:
        """Read again; what TLS has already decrypted is read at once."""
        if not self.paused:
            return
        self.paused = False
        self._judge_after = self.loop.time() + self.keepalive
        if self._fd is not None:
            self.loop.add_reader(self._fd, self._read)
            self.loop.call_soon(self._read)

    def detach(self) -> None:
        """Take the socket out of the selector (the connection is being dropped)."""
        if self._sock is not None:
            self._closed(self._sock)
