"""Serving the app with uvicorn: binding, timeouts, a cap on concurrent connections, graceful shutdown.

`make_server` binds the socket at once (port 0 picks a free one, readable from `server_address` before serving),
so tests and the CLI share one object: `serve_forever()` runs uvicorn (on SIGTERM or Ctrl-C it stops accepting,
lets in-flight requests and streams finish for up to `graceful_shutdown_s`, then stops the decode loop);
`shutdown()` does the same from another thread.
"""

from __future__ import annotations

import socket
import threading

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..inference.engine import Engine
from .app import ServerState, build_app

HEADER_TIMEOUT_S = 30.0  # a request's headers must arrive within this long


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus a deadline on a request's headers: uvicorn itself times out only idle
    keep-alive connections, so a client sending half a request line would hold its connection forever."""

    header_timeout_s = HEADER_TIMEOUT_S

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._headers_due = self.loop.call_later(self.header_timeout_s, self._headers_overdue)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE and self._headers_due is None:  # a new request has begun
            self._headers_due = self.loop.call_later(self.header_timeout_s, self._headers_overdue)
        elif self.conn.their_state is not h11.IDLE and self._headers_due is not None:
            self._headers_due.cancel()
            self._headers_due = None

    def connection_lost(self, exc) -> None:
        if self._headers_due is not None:
            self._headers_due.cancel()
            self._headers_due = None
        super().connection_lost(exc)

    def _headers_overdue(self) -> None:
        self._headers_due = None
        if self.conn.their_state is h11.IDLE and self.conn.our_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


class Server:
    """A bound uvicorn server over a `ServerState`."""

    def __init__(self, state: ServerState, host: str, port: int, max_connections: int = 256,
                 timeout_keep_alive: int = 5, graceful_shutdown_s: int = 30):
        self.state = state
        self.app = build_app(state)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.socket.listen(2048)  # connections wait in the backlog until uvicorn has started
        self.server_address = self.socket.getsockname()
        config = uvicorn.Config(self.app, http=TimedH11Protocol, lifespan="on", log_level="warning",
                                access_log=False, limit_concurrency=max_connections,
                                timeout_keep_alive=timeout_keep_alive, timeout_graceful_shutdown=graceful_shutdown_s)
        self.uvicorn = uvicorn.Server(config)
        self._done = threading.Event()

    @property
    def engine(self) -> Engine:
        return self.state.engine

    @property
    def scheduler(self):
        return self.state.scheduler

    @property
    def metrics(self):
        return self.state.metrics

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def serve_forever(self) -> None:
        """Serve until `shutdown()` (or, on the main thread, SIGTERM / Ctrl-C)."""
        try:
            self.uvicorn.run(sockets=[self.socket])
        finally:
            self._done.set()

    def shutdown(self, timeout: float = 60.0) -> None:
        """Stop serving (draining in-flight requests) and wait for `serve_forever` to return."""
        self.uvicorn.should_exit = True
        self._done.wait(timeout)

    def server_close(self) -> None:
        self.socket.close()


def make_server(engine: Engine, model_name: str, host: str = "127.0.0.1", port: int = 8000,
                api_key: str | None = None, max_queue: int = 64, **kwargs) -> Server:
    """A server bound to host:port (port 0: a free one); run it with `serve_forever()`, stop it with `shutdown()`.
    kwargs: `max_connections`, `timeout_keep_alive`, `graceful_shutdown_s` (see `Server`)."""
    return Server(ServerState(engine, model_name, api_key, max_queue), host, port, **kwargs)
