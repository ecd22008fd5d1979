"""core.natsconn.connect: a refused NATS connection leaves no socket behind."""

from __future__ import annotations

import asyncio
import gc
import warnings

import nats.errors
import pytest

from core.natsconn import connect


async def _refused_three_times() -> None:
    async def refuse(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(b'INFO {"server_id":"x","version":"2.9.10","proto":1}\r\n')
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(b"-ERR 'Authorization Violation'\r\n")
            await writer.drain()
            await asyncio.sleep(0.5)
        finally:
            writer.close()

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        for _ in range(3):
            with pytest.raises(nats.errors.Error):
                await connect(
                    servers=[f"nats://127.0.0.1:{port}"], connect_timeout=2, allow_reconnect=False
                )
    finally:
        server.close()
        await server.wait_closed()


def test_a_refused_connect_closes_its_socket() -> None:
    """nats-py 2.16 leaves it open (it warned "unclosed transport" in a later test)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        asyncio.run(_refused_three_times())
        gc.collect()
    leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert leaks == []
