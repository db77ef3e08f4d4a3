"""From a validated request to engine requests and back: tokenizing prompts, the context checks, submitting to
the scheduler, and reading the events on the event loop (stopping, and freeing the slots, when the client goes).
Shared by the completions and chat handlers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request as HTTPRequest
from starlette.responses import StreamingResponse

from ..inference.engine import Engine, Event, Request
from ..inference.sampling import SamplingParams
from .protocol import APIError, SamplingFields, sse
from .scheduler import QueueFull, Scheduler


class ClientGone(Exception):
    """The client closed the connection before its answer was complete."""


class ServerStopping(Exception):
    """The server's graceful-shutdown time ran out before the generation finished (`Generation.end`)."""


async def tokenize(engine: Engine, prompt: str | list[int], param: str, images: bool = False) -> list[int]:
    """Token ids of a text prompt (after begin-of-text) or the given ids; APIError(400) unless they fit the context.

    A text far too long for the context is refused before tokenizing it, and tokenizing runs off the event loop.
    """
    if isinstance(prompt, str):
        try:
            size = len(prompt.encode("utf-8"))
        except UnicodeEncodeError as e:
            raise APIError(400, f"{param} is not valid Unicode text: {e.reason} at character {e.start}",
                           param) from None
        if size > engine.max_seq_len * engine.tokenizer.max_token_bytes:
            raise APIError(400, f"{param} has {size} bytes: more tokens than the context length "
                                f"{engine.max_seq_len}", param, "context_length_exceeded")
        ids = await run_in_threadpool(engine.tokenizer.encode, prompt)
    else:
        ids = list(prompt)
    try:
        engine.check_prompt(ids, images=images)
    except ValueError as e:
        code = "context_length_exceeded" if len(ids) >= engine.max_seq_len else None
        raise APIError(400, f"{param}: {e}", param, code) from None
    return ids


def max_new_tokens(engine: Engine, prompt_len: int, requested: int | None, default: int | None,
                   param: str) -> int:
    """The tokens a request may generate: what it asked for, which must fit after the prompt (OpenAI and vLLM
    answer 400 otherwise), or the default cut to the room left."""
    room = engine.max_seq_len - prompt_len
    if requested is None:
        return room if default is None else min(default, room)
    if requested > room:
        raise APIError(400, f"{param}={requested} is too large: the prompt has {prompt_len} tokens and the "
                            f"context length is {engine.max_seq_len}, so at most {room} can be generated",
                       param, "context_length_exceeded")
    return requested


def sampling_params(body: SamplingFields, max_tokens: int, stop: list[str], logprobs: int | None,
                    prompt_logprobs: int | None) -> SamplingParams:
    """The engine's settings for one prompt of a request (unset fields take the engine's defaults)."""
    return SamplingParams(
        max_new_tokens=max_tokens, stop=stop, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        frequency_penalty=body.frequency_penalty or 0.0, presence_penalty=body.presence_penalty or 0.0,
        seed=body.seed, ignore_eos=body.ignore_eos)


class Generation:
    """One HTTP request's engine requests (one per prompt) and the events they produce, read on the event loop."""

    def __init__(self, scheduler: Scheduler, requests: list[Request], registry: set | None = None):
        self.scheduler = scheduler
        self.requests = requests
        self._queue: asyncio.Queue[Event | ServerStopping] = asyncio.Queue()
        self._open = len(requests)
        self._registry = registry  # the server's unfinished generations, which a shutdown ends
        self.started = time.perf_counter()

    def start(self) -> None:
        """Submit every request; APIError(503) when the waiting queue is full."""
        loop = asyncio.get_running_loop()

        def deliver(event: Event) -> None:  # on the decode thread
            loop.call_soon_threadsafe(self._queue.put_nowait, event)

        try:
            self.scheduler.submit(self.requests, deliver)
        except QueueFull as e:
            raise APIError(503, f"the server is busy: {e}; retry later", type="server_error") from None
        if self._registry is not None:
            self._registry.add(self)

    def end(self, reason: str) -> None:
        """Make `events()` raise ServerStopping(reason) next, even while requests are unfinished (on the loop)."""
        if self._open:
            self._queue.put_nowait(ServerStopping(reason))

    async def events(self, client: HTTPRequest | None = None) -> AsyncIterator[Event]:
        """Every event until all requests have finished; raises ClientGone if `client` disconnects first
        (streams leave that to the response, which calls `cancel`), or ServerStopping after `end`."""
        watcher = asyncio.ensure_future(_disconnected(client)) if client is not None else None
        try:
            while self._open:
                if watcher is None:
                    event = await self._queue.get()
                else:
                    get = asyncio.ensure_future(self._queue.get())
                    await asyncio.wait({get, watcher}, return_when=asyncio.FIRST_COMPLETED)
                    if not get.done():
                        get.cancel()
                        raise ClientGone()
                    event = get.result()
                if isinstance(event, ServerStopping):
                    self.cancel()
                    raise event
                self._open -= event.finished
                yield event
        finally:
            if watcher is not None:
                watcher.cancel()
            if self._registry is not None:
                self._registry.discard(self)

    async def collect(self, client: HTTPRequest) -> bool:
        """Wait until every request has finished; False, with their slots freed, if the client went away first.
        Raises APIError(500) if the engine failed any of them, APIError(503) if the server ended it (shutdown)."""
        try:
            async for _ in self.events(client):
                pass
        except ClientGone:
            self.cancel()
            return False
        except ServerStopping as e:
            raise APIError(503, f"{e}; retry on another server", type="server_error") from None
        raise_if_failed(self.requests)
        return True

    def cancel(self) -> None:
        """Free the slots of whatever has not finished (the client went away, or the server is stopping)."""
        for r in self.requests:
            if not r.done:
                self.scheduler.cancel(r)
        if self._registry is not None:
            self._registry.discard(self)


async def _disconnected(client: HTTPRequest) -> None:
    """Return once the client has closed the connection (the body has been read: receive() waits for that)."""
    while True:
        message = await client.receive()
        if message["type"] == "http.disconnect":
            return


class EventStream(StreamingResponse):
    """Server-sent events that call `on_close` however the response ends (finished, or the client gone); a stream
    that the server ends (ServerStopping) sends an error event and [DONE] instead of being cut off."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(_ended_cleanly(content), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
            await self.body_iterator.aclose()


def check_model(requested: str, served: str) -> None:
    """APIError(404) unless the request names the served model (OpenAI answers an unknown model with 404)."""
    if requested != served:
        raise APIError(404, f"model={requested[:100]!r} is not served here: expected {served!r}", "model",
                       "model_not_found")


async def _ended_cleanly(content: AsyncIterator[str]) -> AsyncIterator[str]:
    try:
        async for chunk in content:
            yield chunk
    except ServerStopping as e:
        yield sse(APIError(503, f"{e}; the stream was cut", type="server_error").body())
        yield "data: [DONE]\n\n"
    finally:
        await content.aclose()


def raise_if_failed(requests: list[Request]) -> None:
    """APIError(500) if the engine failed any of them (the details are in the server's log, not the answer)."""
    if any(r.finish_reason == "error" for r in requests):
        raise APIError(500, "generation failed on the server; the error is in the server's log", type="server_error")
