"""The decoding engine: requests in fixed cache slots, prefilled and then decoded together one step at a time.

Every `step()` decodes all running requests in one forward and prefills the ones added since the last step, so a
request that arrives mid-generation joins the next step instead of waiting for the batch to finish (continuous
batching). Prompts of different lengths share a forward: each slot keeps its own length and positions, and
padding never enters another token's attention.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .cache import LatentCache
from .sampling import SamplingParams, next_token_probs, sample
from .speculative import MTPDrafter, verify
from .tokenizer import TextStream, Tokenizer

SPECULATIVE_METHODS = ("mtp",)
DEFAULT_MAX_SEQ_LEN = 4096
_ids = itertools.count()


@dataclass(eq=False)
class Request:
    """One prompt being completed, and what has come out of it so far."""

    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    text: str = ""  # the completion's text (with a tokenizer), cut before any stop string
    finish_reason: str | None = None  # "stop" (end-of-text or a stop string) or "length"
    cancelled: bool = False  # set from any thread; the engine frees the slot at its next step
    forwards: int = 0  # main-model forwards this request took part in
    drafted: int = 0  # MTP drafts verified
    accepted: int = 0  # ... and accepted
    slot: int | None = None
    _stream: TextStream | None = None
    _generator: torch.Generator | None = None
    _last: int | None = None  # the newest token: sampled, not yet in the cache
    _draft: int | None = None  # the MTP module's guess at the token after _last

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.cancelled


@dataclass
class Event:
    """What one step produced for one request: new token ids, the text they completed, and whether it ended."""

    request: Request
    token_ids: list[int]
    text: str
    finished: bool


class Engine:
    """Batched generation with MLA's latent cache, for up to `max_batch_size` concurrent requests.

    `speculative='mtp'` drafts one token per step with the model's first MTP module and verifies it in the same
    forward as the newest token (see `speculative.py`).
    """

    def __init__(self, model, tokenizer: Tokenizer | None = None, max_batch_size: int = 8,
                 max_seq_len: int | None = None, speculative: str | None = None):
        if speculative not in (None, *SPECULATIVE_METHODS):
            raise ValueError(f"speculative={speculative!r} is invalid: expected None or one of {SPECULATIVE_METHODS}")
        self.model = model.eval()
        self.config = model.config
        self.tokenizer = tokenizer
        # The cache is preallocated for max_seq_len tokens a slot: DeepSeek-V3's 163,840 would be tens of GB.
        self.max_seq_len = max_seq_len or min(self.config.max_position_embeddings, DEFAULT_MAX_SEQ_LEN)
        if not 1 < self.max_seq_len <= self.config.max_position_embeddings:
            raise ValueError(f"max_seq_len={self.max_seq_len} is invalid: expected 2 to the model's "
                             f"max_position_embeddings={self.config.max_position_embeddings}")
        param = next(model.parameters())
        self.cache = LatentCache.for_model(self.config, self.config.num_hidden_layers, max_batch_size,
                                           self.max_seq_len, param.dtype, param.device)
        self.drafter = MTPDrafter(model, max_batch_size, self.max_seq_len) if speculative else None
        self.eos_token_id = tokenizer.eos_token_id if tokenizer is not None else self.config.eos_token_id
        self.free_slots = list(range(max_batch_size))[::-1]
        self.running: list[Request] = []
        self._new: list[Request] = []

    # ----------------------------------------------------------------------------------------------- requests
    @property
    def has_capacity(self) -> bool:
        return bool(self.free_slots)

    @property
    def requests(self) -> list[Request]:
        """Requests holding a slot: running, then added since the last step."""
        return self.running + self._new

    @property
    def active(self) -> int:
        return len(self.running) + len(self._new)

    def check_prompt(self, prompt_ids: list[int]) -> None:
        """Raise ValueError unless the prompt is non-empty, in the vocabulary and shorter than the context."""
        if not prompt_ids:
            raise ValueError("the prompt is empty: expected at least one token")
        if len(prompt_ids) >= self.max_seq_len:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens: expected fewer than the context length "
                             f"{self.max_seq_len}")
        bad = [t for t in prompt_ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is invalid: expected 0 to {self.config.vocab_size - 1}")

    def add(self, request: Request) -> Request:
        """Give the request a free slot; it is prefilled at the next step. Raises RuntimeError when all are taken."""
        self.check_prompt(request.prompt_ids)
        request._generator = request.params.generator()
        if self.tokenizer is not None:
            request._stream = TextStream(self.tokenizer, request.params.stop)
        if request.params.max_new_tokens == 0:
            request.finish_reason = "length"
            return request
        if not self.free_slots:
            raise RuntimeError(f"all {self.cache.batch_size} slots are busy")
        request.slot = self.free_slots.pop()
        self.cache.reset(request.slot)
        if self.drafter is not None:
            self.drafter.reset(request.slot)
        self._new.append(request)
        return request

    # ------------------------------------------------------------------------------------------------- stepping
    @torch.inference_mode()
    def step(self) -> list[Event]:
        """Decode every running request by one forward and prefill the new ones; returns what each produced."""
        self._release([r for r in self.running + self._new if r.cancelled])
        decoding, self._new, prefilling = self.running, [], self._new
        events: list[Event] = []
        if decoding:
            events += self._decode_speculative(decoding) if self.drafter else self._decode(decoding)
        if prefilling:
            events += self._prefill(prefilling)
        self.running = [r for r in decoding + prefilling if not r.done]
        self._release([r for r in decoding + prefilling if r.done])
        return events

    def _release(self, requests: list[Request]) -> None:
        for r in requests:
            if r.slot is not None:
                self.free_slots.append(r.slot)
                r.slot = None
        self.running = [r for r in self.running if r.slot is not None]
        self._new = [r for r in self._new if r.slot is not None]

    def _forward(self, requests: list[Request], ids: list[list[int]]):
        """One main-model forward of each request's new tokens ids[i] (right-padded) over its cached ones."""
        n_new = [len(x) for x in ids]
        width = max(n_new)
        device = self.cache.c_kv.device
        tokens = torch.tensor([x + [0] * (width - len(x)) for x in ids], device=device)
        step = self.cache.step([r.slot for r in requests], n_new, width)
        for r in requests:
            r.forwards += 1
        return self.model(tokens, position_ids=step.positions, attn_mask=step.attn_mask, cache=step.layers)

    def _prefill(self, requests: list[Request]) -> list[Event]:
        out = self._forward(requests, [r.prompt_ids for r in requests])
        events, draft_rows = [], []
        for i, r in enumerate(requests):
            n = len(r.prompt_ids)
            self.cache.commit(r.slot, n)
            token = sample(next_token_probs(out.logits[i, n - 1], r.params, r.prompt_ids), r._generator)
            events.append(self._emit(r, [token]))
            draft_rows.append((i, r, r.prompt_ids[1:] + [token]))
        self._draft(out.hidden_states, draft_rows)
        return events

    def _decode(self, requests: list[Request]) -> list[Event]:
        out = self._forward(requests, [[r._last] for r in requests])
        events = []
        for i, r in enumerate(requests):
            self.cache.commit(r.slot, 1)
            token = sample(next_token_probs(out.logits[i, 0], r.params, r.prompt_ids + r.output_ids), r._generator)
            events.append(self._emit(r, [token]))
        return events

    def _decode_speculative(self, requests: list[Request]) -> list[Event]:
        out = self._forward(requests, [[r._last, r._draft] for r in requests])
        events, draft_rows = [], []
        for i, r in enumerate(requests):
            context = r.prompt_ids + r.output_ids
            accepted, token = verify(next_token_probs(out.logits[i, 0], r.params, context), r._draft, r._generator)
            r.drafted += 1
            r.accepted += accepted
            tokens = [token]
            if accepted:  # the forward also scored the position after the draft: a second token for free
                probs = next_token_probs(out.logits[i, 1], r.params, context + [token])
                tokens.append(sample(probs, r._generator))
            self.cache.commit(r.slot, len(tokens))
            events.append(self._emit(r, tokens))
            draft_rows.append((i, r, tokens))
        self._draft(out.hidden_states, draft_rows)
        return events

    def _draft(self, hidden: torch.Tensor, rows: list[tuple[int, Request, list[int]]]) -> None:
        """Let the MTP module draft the next token for each still-running request (speculative mode only).

        rows: (batch row, request, the tokens following each position the forward kept)."""
        rows = [(i, r, nxt) for i, r, nxt in rows if not r.done]
        if self.drafter is None or not rows:
            return
        index = torch.tensor([i for i, _, _ in rows], device=hidden.device)
        drafts = self.drafter.draft([r.slot for _, r, _ in rows], hidden[index], [nxt for _, _, nxt in rows])
        for (_, r, _), d in zip(rows, drafts):
            r._draft = d

    def _emit(self, r: Request, tokens: list[int]) -> Event:
        """Append sampled tokens to a request until one of them ends it; returns the step's event for it."""
        kept, text = [], ""
        for token in tokens:
            if token == self.eos_token_id and not r.params.ignore_eos:
                r.finish_reason = "stop"
                break
            kept.append(token)
            r.output_ids.append(token)
            r._last = token
            if r._stream is not None:
                text += r._stream.push(token)
                if r._stream.stopped:
                    r.finish_reason = "stop"
                    break
            if len(r.output_ids) >= r.params.max_new_tokens or len(r.prompt_ids) + len(r.output_ids) >= self.max_seq_len:
                r.finish_reason = "length"
                break
        if r.finish_reason is not None and r._stream is not None:
            text += r._stream.finish()
        r.text += text
        return Event(r, kept, text, r.finish_reason is not None)

    # ----------------------------------------------------------------------------------------- conveniences
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 ) -> list[Request]:
        """Complete every prompt, at most `max_batch_size` at a time; returns the finished requests in order."""
        if not isinstance(params, list):
            params = [params or SamplingParams()] * len(prompts)
        requests = [Request(list(p), sp) for p, sp in zip(prompts, params)]
        for r in requests:
            self.check_prompt(r.prompt_ids)
        waiting = deque(requests)
        while waiting or self.active:
            while waiting and self.has_capacity:
                self.add(waiting.popleft())
            self.step()
        return requests

    def stream(self, prompt_ids: list[int], params: SamplingParams | None = None) -> Iterator[Event]:
        """Complete one prompt, yielding each step's event as it is produced."""
        request = self.add(Request(list(prompt_ids), params or SamplingParams()))
        while not request.done:
            for event in self.step():
                if event.request is request:
                    yield event

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, device=None, **kwargs) -> "Engine":
        """An engine over the model and `tokenizer.json` of a model directory."""
        from .. import from_pretrained

        model = from_pretrained(path, dtype=dtype, device=device)
        tokenizer = Tokenizer(path, model.config.bos_token_id, model.config.eos_token_id)
        return cls(model, tokenizer, **kwargs)
