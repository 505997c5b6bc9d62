"""The router's listening socket (router/server.py `_bind`): connections it accepts have Nagle off.

With Nagle on, a response's body (or an SSE event) written after its headers waits for the client's delayed
ACK, ~40 ms on every request and on streamed tokens. asyncio turns it off only on sockets that say TCP."""
from __future__ import annotations

import asyncio
import socket

from router.server import _bind


def test_accepted_connections_have_tcp_nodelay():
    host = "127.0.0.1"

    async def main() -> int:
        sock = _bind(host, 0)
        accepted: asyncio.Future = asyncio.get_running_loop().create_future()

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            conn = writer.get_extra_info("socket")
            accepted.set_result(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(on_connect, sock=sock)
        async with server:
            _, writer = await asyncio.open_connection(host, sock.getsockname()[1])
            nodelay = await asyncio.wait_for(accepted, 30)
            writer.close()
        return nodelay

    assert asyncio.run(main()) != 0
