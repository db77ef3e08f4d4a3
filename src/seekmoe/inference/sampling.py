"""Choosing the next token: temperature, top-k, top-p (nucleus), penalties, seeded sampling, and log-probabilities.

Sampling must never produce NaN, whatever the request asks: a temperature below `GREEDY_TEMPERATURE` is greedy,
the most likely token always survives top-k and top-p, penalties are bounded, and a distribution that still comes
out non-finite falls back to the argmax of the raw logits. Log-probabilities are those of the model itself (the
log-softmax of the raw logits), never of the distribution the sampler drew from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

GREEDY_TEMPERATURE = 1e-5  # below this, 1/temperature overflows fp32 logits: treat as greedy (vLLM does too)
MAX_LOGPROBS = 20  # alternatives a request may ask for per position (OpenAI's chat limit)
REPETITION_PENALTY_RANGE = (0.01, 100.0)  # beyond it a penalty only turns logits into inf
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's range is [-2**63, 2**64)


@dataclass
class SamplingParams:
    """How one request is decoded. temperature 0 means greedy (argmax); `stop` strings end the text before them.

    `logprobs`: record each generated token's log-probability and that many alternatives (None: none);
    `prompt_logprobs`: the same for the prompt's tokens (the first has none), computed during prefill.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # CTRL's: positive logits of seen tokens / penalty, negative ones * penalty
    frequency_penalty: float = 0.0  # OpenAI's: logit -= frequency_penalty * count in the output so far
    presence_penalty: float = 0.0  # ... and -= presence_penalty once a token has appeared in the output
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # keep going past the end-of-text token (benchmarks)
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first setting outside its range."""
        lo, hi = REPETITION_PENALTY_RANGE
        checks = [
            ("max_new_tokens", _int(self.max_new_tokens) and self.max_new_tokens >= 0, "an integer >= 0"),
            ("temperature", _number(self.temperature) and self.temperature >= 0, "a number >= 0"),
            ("top_k", _int(self.top_k) and self.top_k >= 0, "an integer >= 0"),
            ("top_p", _number(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1]"),
            ("repetition_penalty", _number(self.repetition_penalty) and lo <= self.repetition_penalty <= hi,
             f"a number in [{lo}, {hi}]"),
            ("frequency_penalty", _number(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
             "a number in [-2, 2]"),
            ("presence_penalty", _number(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
             "a number in [-2, 2]"),
            ("seed", self.seed is None or (_int(self.seed) and -(2**63) <= self.seed <= MAX_SEED),
             f"an integer in [-2**63, {MAX_SEED}] or None"),
            ("stop", isinstance(self.stop, list) and all(isinstance(s, str) and s for s in self.stop),
             "a list of non-empty strings"),
            ("logprobs", self.logprobs is None or (_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
             f"an integer in [0, {MAX_LOGPROBS}] or None"),
            ("prompt_logprobs", self.prompt_logprobs is None
             or (_int(self.prompt_logprobs) and 0 <= self.prompt_logprobs <= MAX_LOGPROBS),
             f"an integer in [0, {MAX_LOGPROBS}] or None"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: expected {expected}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def plain_greedy(self) -> bool:
        """Greedy without penalties: the token is the argmax of the raw logits (`greedy_tokens`), whatever came
        before, so it needs no per-token distribution."""
        return (self.greedy and self.repetition_penalty == 1.0 and not self.frequency_penalty
                and not self.presence_penalty)

    def generator(self) -> torch.Generator:
        """The request's random stream: seeded when `seed` is set, else from fresh entropy."""
        g = torch.Generator()
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed)
        return g


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x and abs(x) != float("inf")


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def next_token_probs(logits: torch.Tensor, params: SamplingParams, context: list[int],
                     output: list[int] | None = None) -> torch.Tensor:
    """The distribution [vocab] (fp32) a request samples from, given the logits [vocab], the tokens so far
    (`context`, prompt included: the repetition penalty's) and the generated ones (`output`: OpenAI's penalties').

    Greedy requests get a one-hot distribution on the argmax, so callers treat both cases alike.
    """
    raw = logits.float()
    logits = raw.clone()
    if params.repetition_penalty != 1.0 and context:
        # An image placeholder may lie past the vocabulary: it has no logit to penalize.
        seen = torch.tensor(sorted(t for t in set(context) if t < logits.numel()), device=logits.device)
        picked = logits[seen]
        logits[seen] = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
    if (params.frequency_penalty or params.presence_penalty) and output:
        ids, counts = torch.tensor(output, device=logits.device).unique(return_counts=True)
        logits[ids] -= params.frequency_penalty * counts.float() + params.presence_penalty
    # Overflowed logits (an fp16/bf16 model, a huge penalty) must not turn into NaN below.
    finite = torch.finfo(torch.float32).max
    logits = torch.nan_to_num(logits, nan=float("-inf"), posinf=finite, neginf=float("-inf"))
    if params.greedy or not torch.isfinite(logits).any():
        return _one_hot(logits if torch.isfinite(logits).any() else torch.nan_to_num(raw, nan=float("-inf")))
    logits = logits / params.temperature
    if 0 < params.top_k < logits.numel():
        kth = logits.topk(params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p, and always the most likely token.
        drop = sorted_probs.cumsum(0) - sorted_probs >= params.top_p
        drop[0] = False
        probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
        probs = probs / probs.sum()
    if not torch.isfinite(probs).all() or probs.sum() <= 0:
        return _one_hot(logits)
    return probs


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """The greedy token at every position of logits [..., vocab]: the argmax `next_token_probs` gives a greedy
    request without penalties (NaN never wins, +inf ties go to the first)."""
    finite = torch.finfo(torch.float32).max
    return torch.nan_to_num(logits.float(), nan=float("-inf"), posinf=finite).argmax(dim=-1)


def _one_hot(logits: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(logits).scatter_(0, logits.argmax().view(1), 1.0)


def sample(probs: torch.Tensor, generator: torch.Generator) -> int:
    """Draw one token id from probs [vocab] (the argmax itself when probs is one-hot)."""
    if probs.max() >= 1.0:
        return int(probs.argmax())
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


@dataclass
class TokenLogprob:
    """A token's log-probability under the model, and the `top` most likely tokens at its position."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # [(token id, logprob)], most likely first


def token_logprobs(logits: torch.Tensor, token_ids: list[int], k: int) -> list[TokenLogprob]:
    """Log-probabilities of token_ids[i] under logits [n, vocab] (the log-softmax of the raw logits, in fp32,
    before temperature, penalties or top-k/top-p) and the k likeliest tokens at each of the n positions."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # [n, vocab]
    chosen = logp.gather(1, torch.tensor(token_ids, device=logp.device)[:, None])[:, 0].tolist()
    if k > 0:
        values, ids = logp.topk(k, dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        tops = [[] for _ in token_ids]
    return [TokenLogprob(t, lp, top) for t, lp, top in zip(token_ids, chosen, tops)]
