"""The decoding engine: requests in fixed cache slots, prefilled and then decoded together one step at a time.

Every `step()` decodes all running requests in one forward and prefills the ones added since the last step, so a
request that arrives mid-generation joins the next step instead of waiting for the batch to finish (continuous
batching). Prompts of different lengths share a forward: each slot keeps its own length and positions, and
padding never enters another token's attention.

Prefill is chunked: a step prefills at most `max_prefill_tokens` prompt tokens, so a long prompt takes several
steps while the running requests keep decoding, and no forward scores more than that many queries against the
cache. The tokens go to the prompts with the fewest left first, so a short prompt is not stuck behind a long one
(one client's 400-token prompts used to hold an 8-token one for their whole prefill), except that the request
waiting longest always gets its share (max_prefill_tokens / prompts waiting), so short ones cannot starve it.
A forward or sampling that raises fails only the requests it was computing (finish_reason "error",
`Request.error` says why) and frees their slots; everything else keeps going.
"""

from __future__ import annotations

import itertools
import time
import traceback
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch

from .cache import DecodeCache
from .compiled import DecodeForwards, should_compile
from .sampling import SamplingParams, TokenLogprob, greedy_tokens, next_token_probs, sample, token_logprobs
from .speculative import MTPDrafter, verify
from .tokenizer import TextStream, Tokenizer

SPECULATIVE_METHODS = ("mtp",)
DEFAULT_MAX_SEQ_LEN = 4096
DEFAULT_MAX_PREFILL_TOKENS = 2048
_ids = itertools.count()


@dataclass(eq=False)
class Request:
    """One prompt being completed, and what has come out of it so far."""

    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    text: str = ""  # the completion's text (with a tokenizer), cut before any stop string
    finish_reason: str | None = None  # "stop" (end-of-text or a stop string), "length", or "error"
    error: str | None = None  # why it failed, when finish_reason is "error"
    logprobs: list[TokenLogprob] = field(default_factory=list)  # per output token, when params.logprobs is set
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)  # per prompt token (first: None)
    prefilled: int = 0  # prompt tokens already in the cache
    cancelled: bool = False  # set from any thread; the engine frees the slot at its next step
    forwards: int = 0  # main-model forwards this request took part in
    drafted: int = 0  # MTP drafts verified
    accepted: int = 0  # ... and accepted
    slot: int | None = None
    # A vision-language model's images for the prompt's placeholder tokens (vision/preprocess.py's tensors); their
    # features are computed when the request is added and fill the placeholders' embeddings at prefill.
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    _image_embeds: torch.Tensor | None = None
    _stream: TextStream | None = None
    _generator: torch.Generator | None = None
    _last: int | None = None  # the newest token: sampled, not yet in the cache
    _drafts: list[int] = field(default_factory=list)  # the MTP modules' guesses at the tokens after _last

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
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of token_ids, when the request asked for them


class Engine:
    """Batched generation with MLA's latent cache, for up to `max_batch_size` concurrent requests.

    `speculative='mtp'` drafts `num_speculative_tokens` tokens per step (default: one per MTP module of the model)
    and verifies them in the same forward as the newest token (see `speculative.py`). `compile` runs the decoding
    forwards through torch.compile (see `compiled.py`): True, False, or 'auto'/None = on for CUDA only.
    """

    def __init__(self, model, tokenizer: Tokenizer | None = None, max_batch_size: int = 8,
                 max_seq_len: int | None = None, speculative: str | None = None,
                 max_prefill_tokens: int = DEFAULT_MAX_PREFILL_TOKENS, num_speculative_tokens: int | None = None,
                 compile: bool | str | None = None):
        if speculative not in (None, *SPECULATIVE_METHODS):
            raise ValueError(f"speculative={speculative!r} is invalid: expected None or one of {SPECULATIVE_METHODS}")
        if not (isinstance(max_prefill_tokens, int) and max_prefill_tokens >= 1):
            raise ValueError(f"max_prefill_tokens={max_prefill_tokens!r} is invalid: expected an integer >= 1")
        self.max_prefill_tokens = max_prefill_tokens
        # A vision-language model: its tower runs once a request (at add), the language model does the rest.
        self.vision = model.eval() if hasattr(model, "vision_tower") else None
        self.image_token_id = self.vision.config.image_token_id if self.vision is not None else None
        if self.vision is not None:
            model = model.language_model
        self.model = model.eval()
        self.config = model.config
        self.tokenizer = tokenizer
        # The cache is preallocated for max_seq_len tokens a slot: DeepSeek-V3's 163,840 would be tens of GB.
        self.max_seq_len = max_seq_len or min(self.config.max_position_embeddings, DEFAULT_MAX_SEQ_LEN)
        if not 1 < self.max_seq_len <= self.config.max_position_embeddings:
            raise ValueError(f"max_seq_len={self.max_seq_len} is invalid: expected 2 to the model's "
                             f"max_position_embeddings={self.config.max_position_embeddings}")
        if num_speculative_tokens is not None and not speculative:
            raise ValueError("num_speculative_tokens is set but speculative is off: expected speculative='mtp'")
        param = next(model.parameters())
        self.forwards = DecodeForwards(param.device, should_compile(compile, param.device))
        self.drafter = (MTPDrafter(model, max_batch_size, self.max_seq_len, num_speculative_tokens, self.forwards)
                        if speculative else None)
        # A verifying forward writes the drafts after the newest token: room for them past max_seq_len.
        room = self.drafter.depth if self.drafter else 0
        self.cache = DecodeCache.for_model(model, max_batch_size, self.max_seq_len + room, param.dtype, param.device)
        self.eos_token_id = tokenizer.eos_token_id if tokenizer is not None else self.config.eos_token_id
        self.free_slots = list(range(max_batch_size))[::-1]
        self.running: list[Request] = []
        self._new: list[Request] = []
        # Called as observe(requests, n_new, width) before every main-model forward, while the cache still holds
        # each request's earlier tokens (the new ones start at cache.lengths[slot]): routing replay records with it.
        self.forward_observers: list = []

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

    def check_prompt(self, prompt_ids: list[int], images: bool = False) -> None:
        """Raise ValueError unless the prompt is non-empty, in the vocabulary and shorter than the context (with
        `images`, a vision-language model's image placeholder is a token too)."""
        if not prompt_ids:
            raise ValueError("the prompt is empty: expected at least one token")
        if len(prompt_ids) >= self.max_seq_len:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens: expected fewer than the context length "
                             f"{self.max_seq_len}")
        image = self.image_token_id if images else None
        bad = [t for t in prompt_ids if not 0 <= t < self.config.vocab_size and t != image]
        if bad and bad[0] == self.image_token_id:
            raise ValueError(f"prompt token id {bad[0]} is the image placeholder but the prompt comes with no images")
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is invalid: expected 0 to {self.config.vocab_size - 1}")

    def add(self, request: Request) -> Request:
        """Give the request a free slot; it is prefilled at the next step. Raises RuntimeError when all are taken."""
        self.check_prompt(request.prompt_ids, images=request.pixel_values is not None)
        if self.vision is not None or request.pixel_values is not None:
            from ..vision.inference import request_image_embeds

            request._image_embeds = request_image_embeds(self, request)
        request._generator = request.params.generator()
        if self.tokenizer is not None:
            request._stream = TextStream(self.tokenizer, request.params.stop)
        if request.params.max_new_tokens == 0 and request.params.prompt_logprobs is None:
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
        """Decode every running request by one forward and prefill up to `max_prefill_tokens` prompt tokens of the
        new ones; returns what each produced."""
        self._release([r for r in self.running + self._new if r.cancelled])
        decoding = self.running
        chunks = self._prefill_chunks()
        events: list[Event] = []
        if decoding:
            events += self._guarded(decoding, self._decode_speculative if self.drafter else self._decode)
        if chunks:
            events += self._guarded([r for r, _ in chunks], lambda _: self._prefill(chunks))
        prefilled = [r for r, _ in chunks if r.prefilled == len(r.prompt_ids)]
        self.running = [r for r in decoding + prefilled if not r.done]
        self._new = [r for r in self._new if r not in prefilled and not r.done]
        self._release([r for r in decoding + [r for r, _ in chunks] if r.done])
        return events

    def _prefill_chunks(self) -> list[tuple[Request, int]]:
        """(request, prompt tokens to prefill this step) within `max_prefill_tokens`: the oldest waiting request
        its share, then the rest to the fewest-tokens-left first (ties in arrival order)."""
        if not self._new:
            return []
        left = {r: len(r.prompt_ids) - r.prefilled for r in self._new}
        oldest = self._new[0]
        grant = {oldest: min(left[oldest], max(1, self.max_prefill_tokens // len(self._new)))}
        budget = self.max_prefill_tokens - grant[oldest]
        for r in sorted(self._new, key=left.get):  # sorted() is stable: equal lengths stay in arrival order
            extra = min(left[r] - grant.get(r, 0), budget)
            if extra > 0:
                grant[r] = grant.get(r, 0) + extra
                budget -= extra
        return [(r, grant[r]) for r in self._new if grant.get(r)]

    def fail_all(self, error: str) -> list[Event]:
        """End every request holding a slot with finish_reason "error" and free the slots (after a failed step)."""
        requests = self.requests
        events = [self._fail(r, error) for r in requests if not r.done]
        self._release(requests)
        return events

    def _guarded(self, requests: list[Request], run) -> list[Event]:
        """run(requests); when it raises, only these requests fail (their slots are freed by `step`)."""
        try:
            return run(requests)
        except Exception as e:  # an OOM or a bug costs the requests of this forward, not the engine
            traceback.print_exc()
            return [self._fail(r, f"{type(e).__name__}: {e}") for r in requests]

    def _fail(self, r: Request, error: str) -> Event:
        r.finish_reason, r.error = "error", error
        return Event(r, [], "", True)

    def _release(self, requests: list[Request]) -> None:
        for r in requests:
            if r.slot is not None:
                self.free_slots.append(r.slot)
                r.slot = None
        self.running = [r for r in self.running if r.slot is not None]
        self._new = [r for r in self._new if r.slot is not None]

    def _forward(self, requests: list[Request], ids: list[list[int]],
                 decoding: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """One main-model forward of each request's new tokens ids[i] (right-padded) over its cached ones:
        (logits [B, S, vocab], final hidden states [B, S, hidden]). Decoding forwards (a fixed, small number of
        tokens a request) go through `self.forwards`, compiled when the engine compiles; prefill runs eagerly."""
        n_new = [len(x) for x in ids]
        width = max(n_new)
        device = self.cache.device
        self._count_forward(requests, n_new, width)
        if not decoding:
            tokens = torch.tensor([x + [0] * (width - len(x)) for x in ids], device=device)
            step = self.cache.step([r.slot for r in requests], n_new, width)
            embeds = None
            if any(r._image_embeds is not None for r in requests):
                from ..vision.inference import prefill_embeds

                embeds = prefill_embeds(self.model, self.image_token_id, tokens, requests)
            out = self.model(tokens, position_ids=step.positions, attn_mask=step.attn_mask,
                             cache=self.cache.layers(step), inputs_embeds=embeds)
            return out.logits, out.hidden_states
        batch = self.forwards.batch(len(requests))
        pad = (batch or len(requests)) - len(requests)
        tokens = torch.tensor([x + [0] * (width - len(x)) for x in ids] + [[0] * width] * pad, device=device)
        step = self.cache.step([r.slot for r in requests], n_new, width, batch=batch, full_length=self.forwards.static)
        logits, hidden = self.forwards.main(self.model, tokens, step, self.cache.tensors)
        return logits[: len(requests)], hidden[: len(requests)]

    def _count_forward(self, requests: list[Request], n_new: list[int], width: int) -> None:
        for r in requests:
            r.forwards += 1
        for observe in self.forward_observers:
            observe(requests, n_new, width)

    def _prefill(self, chunks: list[tuple[Request, int]]) -> list[Event]:
        """Prefill the next n prompt tokens of each (request, n); a request whose prompt is then complete samples
        its first token (or, asked for prompt log-probabilities only, finishes)."""
        requests = [r for r, _ in chunks]
        logits_all, hidden = self._forward(requests, [r.prompt_ids[r.prefilled: r.prefilled + n] for r, n in chunks])
        events, draft_rows = [], []
        for i, (r, n) in enumerate(chunks):
            start, end = r.prefilled, r.prefilled + n
            self.cache.commit(r.slot, n)
            r.prefilled = end
            if r.params.prompt_logprobs is not None:
                if start == 0:
                    r.prompt_logprobs.append(None)
                targets = r.prompt_ids[start + 1: end + 1]  # what each position predicts, inside the prompt
                r.prompt_logprobs += token_logprobs(logits_all[i, : len(targets)], targets, r.params.prompt_logprobs)
            if end < len(r.prompt_ids):
                draft_rows.append((i, r, n))
                continue
            if r.params.max_new_tokens == 0:  # scoring only
                r.finish_reason = "length"
                events.append(Event(r, [], "", True))
                continue
            try:
                logits = logits_all[i, n - 1]
                token = sample(next_token_probs(logits, r.params, r.prompt_ids), r._generator)
                events.append(self._emit(r, [token], self._logprobs(r, logits[None], [token])))
            except Exception as e:  # this request's sampling only
                traceback.print_exc()
                events.append(self._fail(r, f"{type(e).__name__}: {e}"))
                continue
            draft_rows.append((i, r, n))
        self._draft(hidden, draft_rows, eager=True)
        return events

    @staticmethod
    def _logprobs(r: Request, logits: torch.Tensor, tokens: list[int]) -> list[TokenLogprob]:
        """Log-probabilities of `tokens` under logits [len(tokens), vocab], if the request asked for them."""
        if r.params.logprobs is None:
            return []
        return token_logprobs(logits, tokens, r.params.logprobs)

    def _decode(self, requests: list[Request]) -> list[Event]:
        logits_all, _ = self._forward(requests, [[r._last] for r in requests], decoding=True)
        greedy = greedy_tokens(logits_all[:, 0]).tolist() if any(r.params.plain_greedy for r in requests) else None
        events = []
        for i, r in enumerate(requests):
            self.cache.commit(r.slot, 1)
            try:
                logits = logits_all[i, 0]
                if r.params.plain_greedy:
                    token = greedy[i]
                else:
                    token = sample(next_token_probs(logits, r.params, r.prompt_ids + r.output_ids, r.output_ids),
                                   r._generator)
                events.append(self._emit(r, [token], self._logprobs(r, logits[None], [token])))
            except Exception as e:  # this request's sampling only
                traceback.print_exc()
                events.append(self._fail(r, f"{type(e).__name__}: {e}"))
        return events

    def _decode_speculative(self, requests: list[Request]) -> list[Event]:
        slots = [r.slot for r in requests]
        if (self.drafter.fused and all(r.params.plain_greedy and r.params.logprobs is None for r in requests)
                and self.drafter.trails(slots, [self.cache.lengths[s] for s in slots])):
            return self._decode_greedy_speculative(requests)
        logits_all, hidden = self._forward(requests, [[r._last] + r._drafts for r in requests], decoding=True)
        greedy = greedy_tokens(logits_all).tolist() if any(r.params.plain_greedy for r in requests) else None
        events, draft_rows = [], []
        for i, r in enumerate(requests):
            context = r.prompt_ids + r.output_ids
            tokens: list[int] = []
            try:
                # Accept drafts while they pass; the main model's prediction after the last accepted one (or in
                # place of the first rejected one) is one more token. A greedy draft passes iff it is the argmax.
                for j, draft in enumerate(r._drafts + [None]):
                    if r.params.plain_greedy:
                        token = greedy[i][j]
                        accepted = token == draft
                    else:
                        probs = next_token_probs(logits_all[i, j], r.params, context + tokens, r.output_ids + tokens)
                        accepted, token = (verify(probs, draft, r._generator) if draft is not None
                                           else (False, sample(probs, r._generator)))
                    tokens.append(token)
                    if draft is None:
                        break
                    r.drafted += 1
                    r.accepted += accepted
                    if not accepted:
                        break
                logprobs = self._logprobs(r, logits_all[i, : len(tokens)], tokens)
            except Exception as e:  # this request's sampling only
                traceback.print_exc()
                events.append(self._fail(r, f"{type(e).__name__}: {e}"))
                continue
            self.cache.commit(r.slot, len(tokens))
            events.append(self._emit(r, tokens, logprobs))
            draft_rows.append((i, r, len(tokens)))
        self._draft(hidden, draft_rows)
        return events

    def _decode_greedy_speculative(self, requests: list[Request]) -> list[Event]:
        """_decode_speculative for greedy requests, verifying and drafting in one forward (MTPDrafter.greedy_step):
        the same tokens, drafts and counts."""
        depth = self.drafter.depth
        self._count_forward(requests, [depth + 1] * len(requests), depth + 1)
        results = self.drafter.greedy_step(self.cache, [r.slot for r in requests],
                                           [[r._last] + r._drafts for r in requests],
                                           self.forwards.batch(len(requests)), self.forwards.static)
        events = []
        for r, (tokens, drafts) in zip(requests, results):
            r.drafted += min(len(tokens), depth)
            r.accepted += len(tokens) - 1
            self.cache.commit(r.slot, len(tokens))
            events.append(self._emit(r, tokens))
            r._drafts = drafts
        return events

    def _draft(self, hidden: torch.Tensor, rows: list[tuple[int, Request, int]], eager: bool = False) -> None:
        """Let the MTP modules draft the next tokens for each still-running request (speculative mode only).

        rows: (batch row, request, how many positions of that row the forward kept); `eager` after a prefill."""
        rows = [(i, r, n) for i, r, n in rows if not r.done]
        if self.drafter is None or not rows:
            return
        index = torch.tensor([i for i, _, _ in rows], device=hidden.device)
        known = [r.prompt_ids + r.output_ids for _, r, _ in rows]
        drafts = self.drafter.draft([r.slot for _, r, _ in rows], hidden[index], [n for _, _, n in rows], known,
                                     eager)
        for (_, r, _), d in zip(rows, drafts):
            r._drafts = d

    def _emit(self, r: Request, tokens: list[int], logprobs: list[TokenLogprob] | None = None) -> Event:
        """Append sampled tokens (and their log-probabilities, if any) to a request until one of them ends it;
        returns the step's event for it."""
        kept, text, kept_logprobs = [], "", []
        for j, token in enumerate(tokens):
            if token == self.eos_token_id and not r.params.ignore_eos:
                r.finish_reason = "stop"
                break
            kept.append(token)
            if logprobs:
                kept_logprobs.append(logprobs[j])
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
        r.logprobs += kept_logprobs
        return Event(r, kept, text, r.finish_reason is not None, kept_logprobs)

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

    def warm_up(self) -> float:
        """Run the decoding forwards once at batch 1 and at the largest batch, so that a compiled engine compiles
        its graphs now rather than during the first requests; returns the seconds it took (0 when not compiled)."""
        if not self.forwards.compiled:
            return 0.0
        start = time.perf_counter()
        greedy = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)
        # With MTP, greedy requests verify and draft in one forward and sampled ones in separate ones: warm both.
        kinds = [greedy, replace(greedy, temperature=1.0, seed=0)] if self.drafter else [greedy]
        prompt = [self.config.bos_token_id or 0] * 3
        for batch in sorted({1, len(self.free_slots)}):
            for params in kinds:
                self.generate([prompt] * batch, params)
        return time.perf_counter() - start

    def stream(self, prompt_ids: list[int], params: SamplingParams | None = None, pixel_values=None,
               image_grid_thw=None) -> Iterator[Event]:
        """Complete one prompt (with its images, for a vision-language model), yielding each step's event."""
        request = self.add(Request(list(prompt_ids), params or SamplingParams(), pixel_values=pixel_values,
                                   image_grid_thw=image_grid_thw))
        while not request.done:
            for event in self.step():
                if event.request is request:
                    yield event

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, device=None, mmap: bool | str = False,
                        **kwargs) -> "Engine":
        """An engine over the model and `tokenizer.json` of a model directory (`mmap`: see seekmoe.from_pretrained)."""
        from .. import from_pretrained

        model = from_pretrained(path, dtype=dtype, device=device, mmap=mmap)
        text = getattr(model, "language_model", model).config  # a vision-language model's language model
        tokenizer = Tokenizer(path, text.bos_token_id, text.eos_token_id)
        return cls(model, tokenizer, **kwargs)
