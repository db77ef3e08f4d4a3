"""POST /v1/chat/completions: messages through the chat template, the reply whole or as deltas, and
`logprobs: true` + `top_logprobs: N` in OpenAI's chat form (token, logprob, bytes, top_logprobs per token)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response

from ..inference.chat_template import CHAT_STOP, format_chat
from ..inference.engine import Request
from ..inference.sampling import TokenLogprob
from ..inference.tokenizer import Tokenizer
from .generation import EventStream, Generation, check_model, max_new_tokens, sampling_params, tokenize
from .protocol import (APIError, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
                       ChatCompletionResponse, ChatLogprobs, ChatResponseMessage, ChatTokenLogprob, DeltaMessage,
                       TopLogprob, new_id, sse, usage)

if TYPE_CHECKING:
    from .app import ServerState


async def create_chat_completion(body: ChatCompletionRequest, http: HTTPRequest, state: ServerState) -> Response:
    """Answer one chat request, whole or as server-sent events."""
    check_model(body.model, state.model_name)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", "top_logprobs")
    engine = state.engine
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    pixel_values = grid = None
    if any(isinstance(m["content"], list) for m in messages):  # content parts: text, and images
        ids, pixel_values, grid = await chat_prompt_with_parts(engine, messages, state)
    else:
        ids = await tokenize(engine, format_chat(messages), "messages")
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    request = Request(ids, sampling_params(body, max_new_tokens(engine, len(ids), requested, None, param),
                                           body.stop_list() + CHAT_STOP, logprobs, None),
                      pixel_values=pixel_values, image_grid_thw=grid)
    generation = Generation(state.scheduler, [request], state.generations)
    generation.start()
    rid = new_id(chat=True)
    if body.stream:
        return EventStream(_stream(body, rid, state, generation), generation.cancel)
    if not await generation.collect(http):
        return Response(status_code=499)  # the client went away
    state.completed(generation)
    choice = ChatChoice(index=0, message=ChatResponseMessage(content=request.text.lstrip()),
                        finish_reason=request.finish_reason,
                        logprobs=_logprobs(engine.tokenizer, request.logprobs) if body.logprobs else None)
    return JSONResponse(ChatCompletionResponse(id=rid, model=state.model_name, choices=[choice],
                                               usage=usage(len(ids), len(request.output_ids))).model_dump())


async def chat_prompt_with_parts(engine, messages: list[dict], state: ServerState):
    """(ids, pixel_values, image_grid_thw) of messages with content parts; images decoded and preprocessed off the
    event loop. APIError(400) saying why for a hostile or unusable image, or images sent to a text model."""
    from ..vision.inference import chat_prompt

    try:
        ids, pixel_values, grid = await run_in_threadpool(chat_prompt, engine, messages, state.allowed_image_dir,
                                                          state.image_limits)
    except ValueError as e:
        raise APIError(400, f"messages: {e}", "messages") from None
    ids = await tokenize(engine, ids, "messages", images=pixel_values is not None)  # image tokens count too
    return ids, pixel_values, grid


async def _stream(body: ChatCompletionRequest, rid: str, state: ServerState, generation: Generation):
    (request,) = generation.requests
    name, tok = state.model_name, state.engine.tokenizer
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    yield sse(ChatCompletionChunk(id=rid, model=name, choices=[
        ChatChunkChoice(index=0, delta=DeltaMessage(role="assistant", content=""))]))
    started = False  # replies drop the space after "Assistant:"
    async for event in generation.events():
        if request.finish_reason == "error":
            yield sse(APIError(500, "generation failed on the server", type="server_error").body())
            break
        text = event.text
        if not started:
            text = text.lstrip()
            started = bool(text)
        logprobs = _logprobs(tok, event.logprobs) if body.logprobs and event.logprobs else None
        use = usage(len(request.prompt_ids), len(request.output_ids))
        if text or event.finished or logprobs:
            choice = ChatChunkChoice(index=0, delta=DeltaMessage(content=text) if text else DeltaMessage(),
                                     logprobs=logprobs, finish_reason=request.finish_reason if event.finished else None)
            yield sse(ChatCompletionChunk(id=rid, model=name, choices=[choice],
                                          usage=use if event.finished and not include_usage else None))
        if event.finished:
            state.completed(generation)
            if include_usage:  # OpenAI's form: a last chunk with no choices, only usage
                yield sse(ChatCompletionChunk(id=rid, model=name, choices=[], usage=use))
    yield "data: [DONE]\n\n"


def _logprobs(tok: Tokenizer, entries: list[TokenLogprob]) -> ChatLogprobs:
    """OpenAI's chat logprobs: each generated token with its logprob, UTF-8 bytes and the top alternatives."""
    def top(token_id: int, logprob: float) -> TopLogprob:
        return TopLogprob(token=tok.token_text(token_id), logprob=logprob, bytes=list(tok.token_bytes(token_id)))

    return ChatLogprobs(content=[ChatTokenLogprob(**top(e.token_id, e.logprob).model_dump(),
                                                  top_logprobs=[top(t, lp) for t, lp in e.top]) for e in entries])
