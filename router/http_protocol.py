"""The HTTP/1 protocol a connection gets: uvicorn's httptools one, but h11 for an HTTP/1.0 client.

httptools (a C parser) frames a streamed event in a few lines of Python where h11 runs its state machine:
~10 us of the router's CPU a streamed token less at 16 streams (bench/RESULTS.md, session 32), and on a
2-core host every microsecond of it is the engine's. But uvicorn's httptools protocol answers an HTTP/1.0
request (curl -0, nginx's default proxy_http_version) with a chunked stream, which HTTP/1.0 has no such
thing as; h11 ends such a response by closing the connection. So a connection's first request line
chooses: HTTP/1.0 gets h11, everything else httptools (h11 too where httptools is not installed).

httptools keeps reading a request's head however long it grows (h11 refuses one still incomplete past 16
KiB); the router's httptools protocol (BoundedHttpTools) answers a head over 16 KiB with 431, so that a client
cannot make the router hold megabytes of headers on each connection it opens.

A connection keeps the protocol its first request chose: an HTTP/1.0 request's connection closes after its
answer (neither protocol keeps an HTTP/1.0 connection alive), and clients that open with HTTP/1.1 do not
switch versions on a connection they keep alive.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools not installed
    HttpToolsProtocol = None

# A request line longer than this without its end goes to httptools as is (which refuses a head that long).
_MAX_SNIFF = 8192
# The longest request head (request line and headers) the router reads: h11's limit for an incomplete one.
MAX_HEAD_BYTES = 16 * 1024
_HEAD_TOO_LARGE = b'{"error":"the request\'s headers are over %d bytes","error_type":"validation"}' % MAX_HEAD_BYTES


def protocol_for(first_line: bytes) -> type[asyncio.Protocol]:
    """The protocol class for a connection whose first request line is `first_line` (without its CRLF)."""
    if HttpToolsProtocol is None or first_line.rstrip().endswith(b"HTTP/1.0"):
        return H11Protocol
    return BoundedHttpTools


if HttpToolsProtocol is not None:
    class BoundedHttpTools(HttpToolsProtocol):
        """uvicorn's httptools protocol, but a request head over MAX_HEAD_BYTES gets 431 and the connection
        closes: counted as it arrives while the head is incomplete (a slow flood), and by the parsed request
        line and headers when a whole head came in one read."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._in_head = True
            self._received = 0  # bytes read while this request's head was incomplete
            self._parsed = 0  # its target and headers, as parsed
            self._too_large = False

        def data_received(self, data: bytes) -> None:
            if self._in_head:
                self._received += len(data)
            super().data_received(data)
            if self._in_head and self._received > MAX_HEAD_BYTES and not self.transport.is_closing():
                self._refuse()

        def on_message_begin(self) -> None:
            self._parsed = 0
            super().on_message_begin()

        def on_url(self, url: bytes) -> None:
            self._count(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count(len(name) + len(value) + 4)
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._in_head, self._received = False, 0
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._in_head = True  # what arrives next is the next request's head
            super().on_message_complete()

        def _count(self, size: int) -> None:
            self._parsed += size
            if self._parsed > MAX_HEAD_BYTES:
                self._too_large = True
                raise ValueError("request head too large")  # httptools stops; uvicorn answers with send_400_response

        def send_400_response(self, msg: str) -> None:
            if self._too_large:
                self._refuse()
            else:
                super().send_400_response(msg)

        def _refuse(self) -> None:
            self.logger.warning("request head over %d bytes: 431", MAX_HEAD_BYTES)
            self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json"
                                 b"\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
                                 % (len(_HEAD_TOO_LARGE), _HEAD_TOO_LARGE))
            self.transport.close()


class VersionDispatch(asyncio.Protocol):
    """Holds a new connection's bytes until its first request line is in, then hands the connection to
    the protocol that line chooses (uvicorn's own HTTP/2 dispatcher works the same way)."""

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        if not config.loaded:
            config.load()
        self.config = config
        self.server_state = server_state
        self.app_state = app_state
        self.loop = _loop or asyncio.get_event_loop()
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.idle: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        self.transport = transport  # type: ignore[assignment]
        # Listed, so that uvicorn's shutdown closes a connection that never sent a byte.
        self.server_state.connections.add(self)
        self.idle = self.loop.call_later(self.config.timeout_keep_alive, transport.close)

    def connection_lost(self, exc: Exception | None) -> None:
        self._unlist()

    def eof_received(self) -> None:
        pass

    def shutdown(self) -> None:
        assert self.transport is not None
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\n")
        if end < 0 and len(self.buffer) < _MAX_SNIFF:
            return
        first_line = self.buffer[:end] if end >= 0 else self.buffer
        self._unlist()
        protocol = protocol_for(first_line)(config=self.config, server_state=self.server_state,  # type: ignore[call-arg]
                                            app_state=self.app_state, _loop=self.loop)
        assert self.transport is not None
        self.transport.set_protocol(protocol)
        protocol.connection_made(self.transport)
        protocol.data_received(self.buffer)

    def _unlist(self) -> None:
        self.server_state.connections.discard(self)
        if self.idle is not None:
            self.idle.cancel()
            self.idle = None
