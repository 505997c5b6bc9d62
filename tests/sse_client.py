"""A server-sent-events stream read off a raw socket, so that a test can cut it exactly where it wants and
see every byte (ids, keep-alive comments). HTTP/1.0, so the body is the bytes until the server closes."""
from __future__ import annotations

import json
import socket
from dataclasses import dataclass


@dataclass
class Event:
    id: str | None
    data: str

    def json(self):
        return json.loads(self.data)


class RawStream:
    def __init__(self, url: str, path: str, body: dict | None = None, headers: dict | None = None,
                 timeout: float = 120.0) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        data = json.dumps(body).encode() if body is not None else b""
        lines = [f"{'POST' if body is not None else 'GET'} {path} HTTP/1.0", f"Host: {host}"]
        if body is not None:
            lines += ["Content-Type: application/json", f"Content-Length: {len(data)}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + data)
        self.buf = b""
        self.closed = False
        while b"\r\n\r\n" not in self.buf:
            self._recv()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        status_line, *fields = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split()[1])
        self.headers = {k.strip().lower(): v.strip() for k, v in (f.split(":", 1) for f in fields)}
        self.comments: list[str] = []

    def _recv(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            self.closed = True
            if b"\r\n\r\n" not in self.buf and not hasattr(self, "status"):
                raise ConnectionError("the server closed the connection before answering")
        self.buf += chunk

    def events(self, count: int | None = None) -> list[Event]:
        """The next `count` events (every one until the server closes, when None); comments go to .comments."""
        out: list[Event] = []
        while count is None or len(out) < count:
            if b"\n\n" not in self.buf:
                if self.closed:
                    break
                self._recv()
                continue
            block, self.buf = self.buf.split(b"\n\n", 1)
            event_id, data = None, []
            for line in block.decode().split("\n"):
                if line.startswith(":"):
                    self.comments.append(line[1:].strip())
                elif line.startswith("id:"):
                    event_id = line[3:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].removeprefix(" "))
            if data:
                out.append(Event(event_id, "\n".join(data)))
        return out

    def wait_bytes(self, marker: bytes, count: int) -> None:
        """Read until the unparsed bytes hold `marker` `count` times (the server closing first fails)."""
        while self.buf.count(marker) < count:
            assert not self.closed, "the server closed the stream"
            self._recv()

    def body(self) -> bytes:
        while not self.closed:
            self._recv()
        return self.buf

    def close(self) -> None:
        self.sock.close()
