"""Serving the app with uvicorn: binding, timeouts, a cap on open connections, graceful shutdown.

`make_server` binds the socket at once (port 0 picks a free one, readable from `server_address` before serving),
so tests and the CLI share one object: `serve_forever()` runs uvicorn (on SIGTERM or Ctrl-C it stops accepting,
lets in-flight requests and streams finish for up to `graceful_shutdown_s`, then ends what is left with an error
event, or a 503, and stops the decode loop); `shutdown()` does the same from another thread.

Connections and requests are bounded separately, so that sockets that send nothing cannot lock anyone out.
uvicorn's own `limit_concurrency` answers 503 to every request once that many connections are open, idle or not:
300 idle sockets made /health and /v1/completions fail until they timed out. Here instead:
- at most `max_connections` connections stay open: a new one beyond that closes the oldest connection that has no
  request in progress (idle keep-alive, never a byte sent, or a request head still arriving). Such a connection
  loses nothing an HTTP client does not already handle (a keep-alive close), and the newest, which will send its
  request within milliseconds, is the last to go. A per-IP cap would not do: clients behind one proxy or NAT share
  an address, and an attacker can use many;
- a connection that has sent nothing is closed after `timeout_keep_alive` seconds, like an idle keep-alive one,
  and a request head must be complete within HEADER_TIMEOUT_S (uvicorn times out neither);
- at most `max_connections` requests run at once (the app's Guard answers 503 beyond), except /health and
  /metrics, which touch no engine and must answer a liveness probe when the server is busiest.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import threading
from collections import OrderedDict

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..inference.engine import Engine
from .app import ServerState, build_app

HEADER_TIMEOUT_S = 30.0  # a request's headers must arrive within this long
STREAM_END_GRACE_S = 2.0  # after the graceful-shutdown time, for cut streams to send their error event and [DONE]


class ConnectionCap:
    """The open connections of one server, oldest first; beyond `limit`, the oldest idle ones are closed."""

    def __init__(self, limit: int, on_evict=None):
        self.limit, self.on_evict = limit, on_evict
        self.open: OrderedDict[TimedH11Protocol, None] = OrderedDict()

    def opened(self, connection: "TimedH11Protocol") -> None:
        self.open[connection] = None
        if len(self.open) <= self.limit:
            return
        for other in list(self.open):
            if len(self.open) <= self.limit:
                break
            if other is not connection and other.idle:
                self.closed(other)
                other.transport.close()
                if self.on_evict is not None:
                    self.on_evict()

    def closed(self, connection: "TimedH11Protocol") -> None:
        self.open.pop(connection, None)


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus a deadline on a request's headers and on a fresh connection's first byte
    (uvicorn times out only idle keep-alive connections), and membership of a `ConnectionCap`."""

    header_timeout_s = HEADER_TIMEOUT_S

    def __init__(self, *args, connection_cap: ConnectionCap | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.connection_cap = connection_cap
        self._first_byte_due: asyncio.TimerHandle | None = None

    @property
    def idle(self) -> bool:
        """No request in progress: nothing sent yet, a request head still arriving, or between keep-alive requests."""
        return self.cycle is None or self.cycle.response_complete

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._headers_due = self.loop.call_later(self.header_timeout_s, self._headers_overdue)
        self._first_byte_due = self.loop.call_later(self.timeout_keep_alive, self._first_byte_overdue)
        if self.connection_cap is not None:
            self.connection_cap.opened(self)

    def data_received(self, data: bytes) -> None:
        if self._first_byte_due is not None:
            self._first_byte_due.cancel()
            self._first_byte_due = None
        super().data_received(data)
        if self.conn.their_state is h11.IDLE and self._headers_due is None:  # a new request has begun
            self._headers_due = self.loop.call_later(self.header_timeout_s, self._headers_overdue)
        elif self.conn.their_state is not h11.IDLE and self._headers_due is not None:
            self._headers_due.cancel()
            self._headers_due = None

    def connection_lost(self, exc) -> None:
        for timer in (self._headers_due, self._first_byte_due):
            if timer is not None:
                timer.cancel()
        self._headers_due = self._first_byte_due = None
        if self.connection_cap is not None:
            self.connection_cap.closed(self)
        super().connection_lost(exc)

    def _first_byte_overdue(self) -> None:
        self._first_byte_due = None
        if not self.transport.is_closing():
            self.transport.close()

    def _headers_overdue(self) -> None:
        self._headers_due = None
        if self.conn.their_state is h11.IDLE and self.conn.our_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


class _Uvicorn(uvicorn.Server):
    """uvicorn's server, ending the generations still running `drain_s` seconds into a graceful shutdown (so that
    each stream gets an error event and [DONE], and each waiting request a 503, before uvicorn cancels them)."""

    def __init__(self, config: uvicorn.Config, state: ServerState, drain_s: float):
        super().__init__(config)
        self.state, self.drain_s = state, drain_s

    async def shutdown(self, sockets=None) -> None:
        deadline = asyncio.get_running_loop().call_later(self.drain_s, self.state.end_generations)
        try:
            await super().shutdown(sockets)
        finally:
            deadline.cancel()


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
        state.max_requests = max_connections
        cap = ConnectionCap(max_connections, on_evict=state.metrics.connection_evicted)
        protocol = functools.partial(TimedH11Protocol, connection_cap=cap)
        config = uvicorn.Config(self.app, http=protocol, lifespan="on", log_level="warning", access_log=False,
                                timeout_keep_alive=timeout_keep_alive,
                                timeout_graceful_shutdown=graceful_shutdown_s + STREAM_END_GRACE_S)
        self.uvicorn = _Uvicorn(config, state, graceful_shutdown_s)
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
                api_key: str | None = None, max_queue: int = 64, allowed_image_dir: str | None = None,
                image_limits=None, **kwargs) -> Server:
    """A server bound to host:port (port 0: a free one); run it with `serve_forever()`, stop it with `shutdown()`.
    `allowed_image_dir`: the folder file:// image URLs may name (None: refused); `image_limits` an ImageLimits.
    kwargs: `max_connections`, `timeout_keep_alive`, `graceful_shutdown_s` (see `Server`)."""
    state = ServerState(engine, model_name, api_key, max_queue, allowed_image_dir=allowed_image_dir)
    if image_limits is not None:
        state.image_limits = image_limits
    return Server(state, host, port, **kwargs)
