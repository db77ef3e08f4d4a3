"""The OpenAI API's shapes as pydantic models: request bodies (validated, so that a bad field is a 400 naming it)
and the answer and chunk objects, plus the error body. `/openapi.json` is generated from these.

Only the fields seekmoe acts on are declared; other OpenAI fields (`user`, `logit_bias`, ...) are ignored, as
vLLM does. Integers are strict (`max_tokens: true` is not 1) and every list has a bound.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator

from ..inference.sampling import MAX_LOGPROBS, MAX_SEED, REPETITION_PENALTY_RANGE

MAX_STOP = 16  # stop strings a request may give: each is searched for at every token (OpenAI allows 4)
MAX_STOP_CHARS = 256
MAX_PROMPTS = 64  # prompts in one batched /v1/completions request
MAX_MESSAGES = 1024
MAX_CONTENT_PARTS = 64  # parts of one message's content (text and images)


class APIError(Exception):
    """An error answered with an OpenAI-style body {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param,
                                             code=self.code)).model_dump()


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# ------------------------------------------------------------------------------------------------------ requests
Penalty = Annotated[float, Field(ge=-2, le=2)]
Stop = Union[Annotated[StrictStr, Field(min_length=1, max_length=MAX_STOP_CHARS)],
             Annotated[list[Annotated[StrictStr, Field(min_length=1, max_length=MAX_STOP_CHARS)]],
                       Field(max_length=MAX_STOP)]]
TokenIds = Annotated[list[Annotated[StrictInt, Field(ge=0, lt=2**31)]], Field(min_length=1)]


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class SamplingFields(BaseModel):
    """What /v1/completions and /v1/chat/completions share."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[StrictInt, Field(ge=0)] | None = None  # vLLM's extension; 0 (or -1): no cut
    repetition_penalty: Annotated[float, Field(ge=REPETITION_PENALTY_RANGE[0],
                                               le=REPETITION_PENALTY_RANGE[1])] | None = None
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    seed: Annotated[StrictInt, Field(ge=-(2**63), le=MAX_SEED)] | None = None
    stop: Stop | None = None
    n: Annotated[StrictInt, Field(ge=1, le=1)] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    ignore_eos: StrictBool = False

    @field_validator("temperature", "top_p", "repetition_penalty", "frequency_penalty", "presence_penalty",
                     mode="before")
    @classmethod
    def _not_a_bool(cls, value):
        if isinstance(value, bool):
            raise ValueError("expected a number, not a boolean")
        return value

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(SamplingFields):
    """POST /v1/completions. `prompt`: a string, strings, token ids, or lists of token ids (one choice each)."""

    prompt: Union[StrictStr, Annotated[list[StrictStr], Field(min_length=1, max_length=MAX_PROMPTS)], TokenIds,
                  Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]]
    max_tokens: Annotated[StrictInt, Field(ge=0)] | None = None
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: StrictBool = False


class ImageURL(BaseModel):
    url: StrictStr  # data:image/...;base64,... or file:///... under --allowed-image-dir; http(s) never fetched
    detail: Literal["auto", "low", "high"] | None = None  # accepted; every image is processed alike


class TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    # OpenAI's content parts: text, and images for a vision-language model (user turns).
    content: Union[StrictStr, Annotated[list[Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]],
                                        Field(min_length=1, max_length=MAX_CONTENT_PARTS)]]


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_tokens: Annotated[StrictInt, Field(ge=0)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=0)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None


# ----------------------------------------------------------------------------------------------------- responses
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)


class CompletionLogprobs(BaseModel):
    """The legacy completions form: parallel lists, one entry per token (the first echoed prompt token's
    logprob and alternatives are null)."""

    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "seekmoe"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def sse(obj: BaseModel | dict) -> str:
    """One server-sent event carrying a JSON object."""
    data = obj.model_dump_json() if isinstance(obj, BaseModel) else json.dumps(obj)
    return f"data: {data}\n\n"
