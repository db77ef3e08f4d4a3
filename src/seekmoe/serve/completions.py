"""POST /v1/completions, OpenAI's legacy completions, complete enough for evaluation harnesses: a prompt that is a
string, strings, token ids or lists of token ids (one choice per prompt, `index` in order), `logprobs: N`,
`echo` (the prompt's own tokens and log-probabilities, the first null), and `max_tokens: 0` with `echo` to score a
text without generating.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response

from ..inference.engine import Request
from ..inference.sampling import TokenLogprob
from ..inference.tokenizer import Tokenizer
from .generation import EventStream, Generation, check_model, max_new_tokens, sampling_params, tokenize
from .protocol import (APIError, CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, new_id,
                       sse, usage)

if TYPE_CHECKING:
    from .app import ServerState

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for this endpoint


async def create_completion(body: CompletionRequest, http: HTTPRequest, state: ServerState) -> Response:
    """Answer one completions request, whole or as server-sent events."""
    check_model(body.model, state.model_name)
    engine = state.engine
    prompts = [body.prompt] if isinstance(body.prompt, str) or isinstance(body.prompt[0], int) else body.prompt
    requests = []
    for p in prompts:
        ids = await tokenize(engine, p, "prompt")
        max_tokens = max_new_tokens(engine, len(ids), body.max_tokens, DEFAULT_MAX_TOKENS, "max_tokens")
        prompt_logprobs = body.logprobs if body.echo and body.logprobs is not None else None
        requests.append(Request(ids, sampling_params(body, max_tokens, body.stop_list(), body.logprobs,
                                                     prompt_logprobs)))
    generation = Generation(state.scheduler, requests, state.generations)
    generation.start()
    rid = new_id(chat=False)
    if body.stream:
        return EventStream(_stream(body, rid, state, generation), generation.cancel)
    if not await generation.collect(http):
        return Response(status_code=499)  # the client went away
    state.completed(generation)
    tok = engine.tokenizer
    choices = []
    for i, r in enumerate(requests):
        echoed = "".join(tok.pieces(r.prompt_ids)) if body.echo else ""
        choices.append(CompletionChoice(index=i, text=echoed + r.text, finish_reason=r.finish_reason,
                                        logprobs=_logprobs(tok, r, body, 0, r.output_ids, r.logprobs, True)))
    use = usage(sum(len(r.prompt_ids) for r in requests), sum(len(r.output_ids) for r in requests))
    return JSONResponse(CompletionResponse(id=rid, model=state.model_name, choices=choices, usage=use).model_dump())


async def _stream(body: CompletionRequest, rid: str, state: ServerState, generation: Generation):
    tok = state.engine.tokenizer
    offsets = [0] * len(generation.requests)  # characters of each choice's text sent so far
    started = [False] * len(generation.requests)
    requests = generation.requests
    async for event in generation.events():
        r = event.request
        i = requests.index(r)
        if r.finish_reason == "error":
            yield sse(APIError(500, "generation failed on the server", type="server_error").body())
            break
        text = event.text
        echo = body.echo and not started[i]
        if echo:
            text = "".join(tok.pieces(r.prompt_ids)) + text
        started[i] = True
        logprobs = _logprobs(tok, r, body, offsets[i], event.token_ids, event.logprobs, echo)
        offsets[i] += len(text)
        if not (text or event.finished or (logprobs and logprobs.tokens)):
            continue
        choice = CompletionChoice(index=i, text=text, logprobs=logprobs,
                                  finish_reason=r.finish_reason if event.finished else None)
        last = event.finished and all(q.done for q in requests)
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        use = usage(sum(len(q.prompt_ids) for q in requests), sum(len(q.output_ids) for q in requests))
        chunk = CompletionResponse(id=rid, model=state.model_name, choices=[choice],
                                   usage=use if last and not include_usage else None)
        yield sse(chunk)
        if last:
            state.completed(generation)
            if include_usage:  # OpenAI's form: a last chunk with no choices, only usage
                yield sse(CompletionResponse(id=rid, model=state.model_name, choices=[], usage=use))
    yield "data: [DONE]\n\n"


def _logprobs(tok: Tokenizer, r: Request, body: CompletionRequest, offset: int, token_ids: list[int],
              entries: list[TokenLogprob], echo: bool) -> CompletionLogprobs | None:
    """The legacy logprobs object for `token_ids` (the prompt's first when echo), their text starting at `offset`."""
    if body.logprobs is None:
        return None
    ids, all_entries = list(token_ids), list(entries)
    if echo and body.echo:
        ids, all_entries = r.prompt_ids + ids, r.prompt_logprobs + all_entries
    out = CompletionLogprobs()
    for token_id, piece, entry in zip(ids, tok.pieces(ids), all_entries):
        out.tokens.append(tok.token_text(token_id))
        out.text_offset.append(offset)
        offset += len(piece)
        if entry is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        top = {tok.token_text(t): lp for t, lp in entry.top}
        top.setdefault(tok.token_text(token_id), entry.logprob)  # OpenAI: the sampled token is always there
        out.token_logprobs.append(entry.logprob)
        out.top_logprobs.append(top)
    return out

