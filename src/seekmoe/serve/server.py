"""The HTTP layer: OpenAI's /v1/completions, /v1/chat/completions and /v1/models, plus /health and /metrics.

Each connection gets a handler thread (ThreadingHTTPServer) that validates the request, submits it to the
`Scheduler` and answers from its event queue, whole or as server-sent events. A streaming client that goes away
is noticed at the next write, and its request is cancelled so that its slot is freed.
"""

from __future__ import annotations

import hmac
import json
import time
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ..inference.engine import Engine, Request
from .metrics import Metrics
from .protocol import APIError, answer, chunk, new_id, parse_request, usage
from .scheduler import QueueFull, Scheduler

MAX_BODY_BYTES = 1 << 20
ROUTES = {("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
          ("GET", "/health"), ("GET", "/metrics")}


class SeekmoeServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer that also owns the scheduler and what the handlers share."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], engine: Engine, model_name: str, api_key: str | None,
                 max_queue: int):
        super().__init__(address, Handler)
        self.engine = engine
        self.model_name = model_name
        self.api_key = api_key
        self.metrics = Metrics()
        self.scheduler = Scheduler(engine, self.metrics, max_queue)
        self.started = int(time.time())

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self.scheduler.start()
        try:
            super().serve_forever(poll_interval)
        finally:
            self.scheduler.stop()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


def make_server(engine: Engine, model_name: str, host: str = "127.0.0.1", port: int = 8000,
                api_key: str | None = None, max_queue: int = 64) -> SeekmoeServer:
    """A server bound to host:port (port 0: a free one); run it with `serve_forever()`, stop it with `shutdown()`."""
    if engine.tokenizer is None:
        raise ValueError("the server needs an engine with a tokenizer (Engine.from_pretrained loads tokenizer.json)")
    return SeekmoeServer((host, port), engine, model_name, api_key, max_queue)


class Handler(BaseHTTPRequestHandler):
    """One HTTP request: route, authenticate, validate, then answer."""

    server: SeekmoeServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:  # quiet: /metrics carries the counts
        pass

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def _handle(self, method: str) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        status = 500
        try:
            if (method, path) not in ROUTES:
                known = any(p == path for _, p in ROUTES)
                raise APIError(405 if known else 404, f"{method} {path} is not an endpoint here", code=None,
                               type="invalid_request_error")
            if path.startswith("/v1/"):
                self._authenticate()
            if path == "/health":
                status = self._send_json(200, {"status": "ok"})
            elif path == "/metrics":
                self.server.metrics.queue_depth = self.server.scheduler.queue_depth
                status = self._send(200, self.server.metrics.render().encode(), "text/plain; version=0.0.4")
            elif path == "/v1/models":
                status = self._send_json(200, {"object": "list", "data": [
                    {"id": self.server.model_name, "object": "model", "created": self.server.started,
                     "owned_by": "seekmoe"}]})
            else:
                status = self._complete(chat=path == "/v1/chat/completions")
        except APIError as e:
            status = self._send_json(e.status, e.body())
        except (BrokenPipeError, ConnectionResetError):
            status = 499  # the client closed the connection
        except Exception as e:  # a bug must cost one request, not the connection's thread silently
            traceback.print_exc()
            status = self._send_json(500, APIError(500, f"internal error: {type(e).__name__}: {e}",
                                                   type="server_error").body())
        finally:
            self.server.metrics.request_done(path if (method, path) in ROUTES else "other", status)

    def _authenticate(self) -> None:
        key = self.server.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "")
        if not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), key.encode())):
            raise APIError(401, "missing or wrong API key: expected the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    def _read_json(self):
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise APIError(411 if length is None else 400, "the request needs a Content-Length header")
        if int(length) > MAX_BODY_BYTES:
            raise APIError(413, f"the body has {length} bytes: expected at most {MAX_BODY_BYTES}")
        raw = self.rfile.read(int(length))
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON: {e}") from None

    def _complete(self, chat: bool) -> int:
        server = self.server
        parsed = parse_request(self._read_json(), chat, server.model_name)
        prompt_ids = server.engine.tokenizer.encode(parsed.prompt)
        try:
            server.engine.check_prompt(prompt_ids)
        except ValueError as e:
            raise APIError(400, str(e), "messages" if chat else "prompt", "context_length_exceeded") from None
        request = Request(prompt_ids, parsed.params)
        started = time.perf_counter()
        try:
            events = server.scheduler.submit(request)
        except QueueFull as e:
            raise APIError(503, f"the server is busy: {e}; retry later", type="server_error") from None
        rid = new_id(chat)
        try:
            if parsed.stream:
                status = self._stream(chat, rid, request, events, parsed.include_usage)
            else:
                status = self._collect(chat, rid, request, events)
        except (BrokenPipeError, ConnectionResetError):
            server.scheduler.cancel(request)
            raise
        server.metrics.completion_done(time.perf_counter() - started, len(prompt_ids), len(request.output_ids),
                                       request.drafted, request.accepted)
        return status

    def _collect(self, chat: bool, rid: str, request: Request, events) -> int:
        while True:
            event = events.get()
            if event is None:
                raise APIError(500, "generation failed on the server", type="server_error")
            if event.finished:
                break
        text = request.text.lstrip() if chat else request.text
        use = usage(len(request.prompt_ids), len(request.output_ids))
        return self._send_json(200, answer(chat, rid, self.server.model_name, text, request.finish_reason, use))

    def _stream(self, chat: bool, rid: str, request: Request, events, include_usage: bool) -> int:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the stream ends when the connection does
        self.end_headers()
        self.close_connection = True
        name = self.server.model_name
        if chat:
            self._event(chunk(chat, rid, name, "", None, first=True))
        started = False  # chat replies drop the space after "Assistant:"
        while True:
            event = events.get()
            if event is None:
                self._event({"error": {"message": "generation failed on the server", "type": "server_error"}})
                break
            text = event.text
            if chat and not started:
                text = text.lstrip()
                started = bool(text)
            use = usage(len(request.prompt_ids), len(request.output_ids)) if event.finished else None
            if text or event.finished:
                self._event(chunk(chat, rid, name, text, request.finish_reason if event.finished else None,
                                  None if include_usage else use))
            if event.finished:
                if include_usage:  # OpenAI's form: a last chunk with no choices, only usage
                    self._event(chunk(chat, rid, name, None, None, use))
                break
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()
        return 200

    def _event(self, obj: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
        self.wfile.flush()

    def _send_json(self, status: int, obj: dict) -> int:
        return self._send(status, json.dumps(obj).encode(), "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> int:
        self.send_response(status, HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else None)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        return status
