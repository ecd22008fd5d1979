"""Connecting to NATS without leaking a refused connection's socket.

nats-py (2.16) raises from `connect()` on a refused first attempt with `allow_reconnect=False`
without closing the TLS transport it opened: the socket stays open until the garbage
collector finds it, and then warns "unclosed transport" in whatever code runs at that
moment (a CI flake in an unrelated test). This closes the client through its public
`close()` before the error goes on.
"""

from __future__ import annotations

from typing import Any

from nats.aio.client import Client


async def connect(**options: Any) -> Client:
    """`nats.connect(**options)`, closing what the attempt opened when it fails."""
    nc = Client()
    try:
        await nc.connect(**options)
    except BaseException:
        await nc.close()
        raise
    return nc
