"""The router process: bind the port first, then run uvicorn with a drain on SIGTERM."""

from __future__ import annotations

import logging
import signal
import socket
import time

from .admission import Load
from .config import RouterSettings

log = logging.getLogger("sluice.router")


def _bind(host: str, port: int) -> socket.socket:
    """Bind before the (slow) start-up so a taken port fails at once, with a message that says so."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, not left 0: asyncio turns Nagle off (TCP_NODELAY) only on sockets whose proto
    # says TCP, and accepted connections inherit it. With proto 0, a response's body (or an SSE event)
    # written after its headers waited for the client's delayed ACK: ~40 ms on every request.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SystemExit(f"sluice router: cannot listen on {host}:{port}: {exc.strerror} "
                         f"(is another server using port {port}? pass --port)") from None
    sock.set_inheritable(True)
    return sock


def serve(settings: RouterSettings) -> None:
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn, but SIGTERM drains first: the router keeps listening and answers 503 (so a load
        balancer's probes see it) while admitted requests finish, for up to `shutdown_timeout_s`; then
        uvicorn's own shutdown runs. SIGINT, or a second SIGTERM, still stops at once."""

        drain_deadline: float | None = None
        abort_deadline: float | None = None

        def handle_exit(self, sig, frame) -> None:
            if sig == signal.SIGTERM and self.drain_deadline is None:
                # Not passed on to uvicorn, which would re-raise the signal after shutting down and so
                # turn a clean drain into death by SIGTERM (exit status -15 instead of 0).
                self.drain_deadline = time.monotonic() + settings.shutdown_timeout_s
                load.draining = True
                log.info("SIGTERM: draining %d request(s) in flight, for up to %.0f s",
                         load.in_flight, settings.shutdown_timeout_s)
                return
            super().handle_exit(sig, frame)

        async def on_tick(self, counter: int) -> bool:
            if self.drain_deadline is not None and not self.should_exit:
                now = time.monotonic()
                if load.in_flight and now >= self.drain_deadline and self.abort_deadline is None:
                    # Streams still going get a last error event (non-streamed requests a 500) rather than
                    # a connection that just drops; a moment later uvicorn closes whatever is left.
                    log.warning("shutdown timeout: stopping %d request(s) still in flight", load.in_flight)
                    app.state.router.pool.abort_all(
                        f"the server is shutting down: generation stopped after the {settings.shutdown_timeout_s:g} s "
                        "shutdown timeout")
                    self.abort_deadline = now + 2.0
                if load.in_flight == 0 or (self.abort_deadline is not None and now >= self.abort_deadline):
                    self.should_exit = True
            return await super().on_tick(counter)

    from .app import create_app
    from .http_protocol import VersionDispatch

    sock = _bind(settings.hostname, settings.port)
    app = create_app(settings)
    load: Load = app.state.load
    signal.signal(signal.SIGHUP, lambda sig, frame: app.state.tenants.reload())  # the keys file, reread
    # log_config=None: uvicorn's loggers go through ours (the request id in every line, the access log too).
    # httptools, but h11 for HTTP/1.0 clients: router/http_protocol.py says why.
    config = uvicorn.Config(app, log_level="info", log_config=None, timeout_graceful_shutdown=5,
                            timeout_keep_alive=30, http=VersionDispatch)
    server = DrainingServer(config)
    log.info("router listening on http://%s:%d", settings.hostname, settings.port)
    server.run(sockets=[sock])
    if not server.started:
        raise SystemExit("sluice router: start-up failed (see the log above)")
