"""The OpenAI API's shapes: request bodies validated into engine inputs, and the answer and chunk objects."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from ..inference.chat_template import CHAT_STOP, format_chat
from ..inference.sampling import SamplingParams


class APIError(Exception):
    """An error answered with an OpenAI-style body {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ParsedRequest:
    """A validated completion or chat request."""

    chat: bool
    prompt: str
    params: SamplingParams
    stream: bool
    include_usage: bool


def parse_request(body, chat: bool, model_name: str) -> ParsedRequest:
    """Validate a /v1/completions (chat=False) or /v1/chat/completions body; raises APIError(400) naming the field."""
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if model != model_name:
        raise APIError(400, f"model={model!r} is not served here: expected {model_name!r}", "model", "model_not_found")
    if chat:
        try:
            prompt = format_chat(body.get("messages"))
        except ValueError as e:
            raise APIError(400, str(e), "messages") from None
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise APIError(400, f"prompt={_short(prompt)} is invalid: expected a non-empty string", "prompt")
    n = body.get("n", 1)
    if n not in (1, None):
        raise APIError(400, f"n={n!r} is not supported: expected 1", "n")
    max_key = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
    max_tokens = body.get(max_key)
    if max_tokens is None:
        max_tokens = 256 if chat else 16  # OpenAI's completions default is 16
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    fields = dict(max_new_tokens=(max_key, max_tokens), temperature=("temperature", _default(body, "temperature", 1.0)),
                  top_p=("top_p", _default(body, "top_p", 1.0)), top_k=("top_k", _default(body, "top_k", 0)),
                  repetition_penalty=("repetition_penalty", _default(body, "repetition_penalty", 1.0)),
                  seed=("seed", body.get("seed")), stop=("stop", stop))
    try:
        params = SamplingParams(**{k: v for k, (_, v) in fields.items()})
    except ValueError as e:
        name = str(e).split("=", 1)[0]
        api_name = fields.get(name, (name,))[0]
        raise APIError(400, str(e).replace(f"{name}=", f"{api_name}=", 1), api_name) from None
    if chat:
        params.stop = params.stop + CHAT_STOP
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, f"stream={stream!r} is invalid: expected true or false", "stream")
    options = body.get("stream_options") or {}
    return ParsedRequest(chat, prompt, params, stream, bool(isinstance(options, dict) and options.get("include_usage")))


def _default(body: dict, key: str, value):
    return value if body.get(key) is None else body[key]


def _short(value) -> str:
    text = repr(value)
    return text if len(text) < 80 else text[:77] + "..."


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def answer(chat: bool, rid: str, model: str, text: str, finish_reason: str, use: dict) -> dict:
    """The whole (non-streamed) completion object."""
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": use}


def chunk(chat: bool, rid: str, model: str, text: str | None, finish_reason: str | None, use: dict | None = None,
          first: bool = False) -> dict:
    """One server-sent event of a streamed completion (text None: a usage-only chunk with no choices)."""
    if chat:
        delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    out = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
           "model": model, "choices": [] if text is None and finish_reason is None else [choice]}
    if use is not None:
        out["usage"] = use
    return out
