"""The ASGI app: routes, the API key, request limits and OpenAI-style errors around the endpoint handlers.

Endpoints: POST /v1/completions (completions.py), POST /v1/chat/completions (chat.py), GET /v1/models, GET /health
(503 when the decode loop is dead, failing or stuck), GET /metrics (Prometheus). Every error, including a
malformed body or a validation failure, is an OpenAI error object; a validation failure is a 400 that names the
field. The scheduler thread starts and stops with the app's lifespan.
"""

from __future__ import annotations

import asyncio
import hmac
import time
import traceback
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response

from ..inference.engine import Engine
from ..vision.images import ImageLimits
from .chat import create_chat_completion
from .completions import create_completion
from .generation import Generation
from .metrics import Metrics
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from .scheduler import Scheduler

MAX_BODY_BYTES = 1 << 20
BODY_TIMEOUT_S = 30.0  # a body must arrive within this long (a client that stops mid-body holds a task)


@dataclass
class ServerState:
    """What the handlers share: the engine, its scheduler, the metrics and the served model's name."""

    engine: Engine
    model_name: str
    api_key: str | None = None
    max_queue: int = 64
    metrics: Metrics = field(default_factory=Metrics)
    started: int = field(default_factory=lambda: int(time.time()))
    scheduler: Scheduler = None  # type: ignore[assignment]
    max_requests: int | None = None  # requests handled at once (beyond: 503), /health and /metrics exempt
    in_flight: int = 0
    generations: set = field(default_factory=set)  # the Generations not yet finished (end_generations ends them)
    allowed_image_dir: str | None = None  # file:// image URLs only under it (None: refused); http(s) never fetched
    image_limits: ImageLimits = field(default_factory=lambda: ImageLimits(max_bytes=MAX_BODY_BYTES))

    def __post_init__(self):
        if self.engine.tokenizer is None:
            raise ValueError("the server needs an engine with a tokenizer (Engine.from_pretrained loads "
                             "tokenizer.json)")
        self.scheduler = Scheduler(self.engine, self.metrics, self.max_queue)

    def end_generations(self) -> None:
        """End every unfinished generation (the graceful-shutdown time is up): streams send an error event and
        [DONE], requests still waiting answer 503, and their engine slots are freed. On the event loop."""
        for generation in list(self.generations):
            generation.end("the server is shutting down and its graceful-shutdown time ran out")

    def completed(self, generation: Generation) -> None:
        """Count a finished request's latency and tokens in the metrics."""
        seconds = time.perf_counter() - generation.started
        for r in generation.requests:
            self.metrics.completion_done(seconds, len(r.prompt_ids), len(r.output_ids), r.drafted, r.accepted)


def build_app(state: ServerState) -> FastAPI:
    """The FastAPI app over a `ServerState`."""

    @asynccontextmanager
    async def lifespan(app):
        state.scheduler.start()
        yield
        await asyncio.to_thread(state.scheduler.stop)

    app = FastAPI(title="seekmoe", summary="An OpenAI-compatible API over a seekmoe model", lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.seekmoe = state
    app.add_middleware(Guard, state=state)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, http: HTTPRequest) -> Response:
        return await create_completion(body, http, state)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, http: HTTPRequest) -> Response:
        return await create_chat_completion(body, http, state)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=state.model_name, created=state.started)])

    @app.get("/health")
    async def health() -> JSONResponse:
        ok, reason = state.scheduler.health()
        return JSONResponse({"status": "ok"} if ok else {"status": "error", "reason": reason},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        state.metrics.queue_depth, state.metrics.running = state.scheduler.queue_depth, state.engine.active
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e: RequestValidationError):
        return JSONResponse(validation_error_body(e.errors()).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        method, path = request.method, request.url.path
        message = {404: f"{path} is not an endpoint here", 405: f"{method} is not allowed on {path}"}.get(
            e.status_code, str(e.detail))
        return JSONResponse(APIError(e.status_code, message).body(), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request, e: Exception):
        traceback.print_exception(e)
        return JSONResponse(APIError(500, "internal server error; the details are in the server's log",
                                     type="server_error").body(), status_code=500)

    return app


def validation_error_body(errors) -> APIError:
    """A 400 naming the first invalid field, without echoing the (possibly huge) input."""
    if not errors:
        return APIError(400, "the request body is invalid")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}")
    path = _field_path(first.get("loc", ()))
    param = path[0] if path else None
    messages = []  # a union (the prompt's four forms) fails once per form: say each once
    for e in errors:
        if _field_path(e.get("loc", ()))[:1] == path[:1] and e["msg"] not in messages:
            messages.append(e["msg"])
    where = ".".join(path) or "the body"
    return APIError(400, f"{where} is invalid: " + "; or ".join(messages[:4]), param)


def _field_path(loc) -> list[str]:
    """A validation error's location as field names and indices, without "body" and pydantic's union-member tags
    ("list[str]", "constrained-str", ...)."""
    return [str(x) for x in loc if x != "body" and not (isinstance(x, str) and
                                                         (x in ("str", "int", "float", "bool") or "[" in x or "-" in x))]


UNCAPPED_PATHS = ("/health", "/metrics")  # cheap, engine-free, and what a liveness probe or monitor calls


class Guard:
    """ASGI middleware in front of the app: the API key on /v1/ paths, the cap on requests handled at once
    (`ServerState.max_requests`, not applied to UNCAPPED_PATHS), a bound on the body's size and on the time it
    takes to arrive (read here in full, so the app never sees a partial body), and request counts by status."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        status = [500]

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        capped = path not in UNCAPPED_PATHS
        if capped:
            self.state.in_flight += 1  # on the event loop: no lock needed
        try:
            error = self._check_key(scope, path)
            limit = self.state.max_requests
            if error is None and capped and limit is not None and self.state.in_flight > limit:
                error = APIError(503, f"the server is busy: {limit} requests are already being handled; retry "
                                      f"later", type="server_error")
            if error is None and scope["method"] in ("POST", "PUT", "PATCH"):
                body, error = await self._read_body(scope, receive)
                if error is None:
                    receive = _replay(body, receive)
            if error is not None:
                headers = {"Connection": "close"} if error.status in (408, 413) else None
                await JSONResponse(error.body(), error.status, headers=headers)(scope, receive, counted_send)
                return
            await self.app(scope, receive, counted_send)
        finally:
            if capped:
                self.state.in_flight -= 1
            known = path in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")
            self.state.metrics.request_done(path if known else "other", status[0])

    def _check_key(self, scope, path: str) -> APIError | None:
        key = self.state.api_key
        if key is None or not path.startswith("/v1/"):
            return None
        given = dict(scope["headers"]).get(b"authorization", b"")
        if given.startswith(b"Bearer ") and hmac.compare_digest(given[7:], key.encode()):
            return None
        return APIError(401, "missing or wrong API key: expected the header 'Authorization: Bearer <key>'",
                        code="invalid_api_key")

    async def _read_body(self, scope, receive) -> tuple[bytes, APIError | None]:
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return b"", APIError(413, f"the body has {length[:20].decode('latin-1')} bytes: expected at most "
                                      f"{MAX_BODY_BYTES}")
        try:
            return await asyncio.wait_for(_receive_body(receive), BODY_TIMEOUT_S)
        except asyncio.TimeoutError:
            return b"", APIError(408, f"the body did not arrive within {BODY_TIMEOUT_S:.0f} s")


async def _receive_body(receive) -> tuple[bytes, APIError | None]:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"", APIError(400, "the client went away before sending its body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:  # a chunked body without a Content-Length
            return b"", APIError(413, f"the body has over {MAX_BODY_BYTES} bytes: expected at most {MAX_BODY_BYTES}")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks), None


def _replay(body: bytes, receive):
    """A receive() that hands the app the already-read body, then whatever the connection sends next."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
