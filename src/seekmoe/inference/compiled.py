"""The cached forwards that decoding repeats every step, run eagerly or captured by torch.compile.

A decode step of a small model is a few hundred tiny operators: on a CPU its time is the per-operator overhead of
eager PyTorch, not arithmetic, and on a GPU it is kernel launches. `DecodeForwards` runs the two forwards a decoding
step repeats — the main model over a few new tokens per slot (1 when decoding, 1 + drafts when verifying MTP drafts)
and one MTP module over its draft positions — either eagerly or compiled, so that the engine has one code path.
Prefill, whose shapes change with every prompt, always runs eagerly.

Compiled on CPU, the batch and context sizes are dynamic: one graph serves every context length, and a batch of one
and larger batches compile separately (torch specializes sizes 0 and 1). On CUDA the forwards are compiled with CUDA
graphs ("reduce-overhead"), which replay fixed shapes: there `static` is set, the engine pads the batch to a power of
two and each step reads every column of the cache (the mask hides the empty ones), so a handful of graphs cover a
whole run.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from .cache import CacheStep, cache_layers

COMPILE_CHOICES = ("auto", "on", "off")
BACKEND = "inductor"  # torch.compile's backend (tests swap in "aot_eager", which captures the same graphs faster)


def should_compile(choice: str | bool | None, device: torch.device, long_running: bool = False) -> bool:
    """Resolve a --compile choice: 'on'/'off', or 'auto' = on for CUDA (graphs pay back within a few requests) and
    for a long-running CPU process such as the server, off for a one-off CPU generation (the compile takes tens of
    seconds there)."""
    if isinstance(choice, bool):
        return choice
    choice = choice or "auto"
    if choice not in COMPILE_CHOICES:
        raise ValueError(f"compile={choice!r} is invalid: expected one of {COMPILE_CHOICES}")
    if choice == "auto":
        return device.type == "cuda" or long_running
    return choice == "on"


def main_forward(model, tokens: torch.Tensor, step: CacheStep, c_kv: torch.Tensor,
                 k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model over tokens [B, S] placed by `step` in the cache tensors c_kv/k_pe [layers, slots, len, ...]:
    (logits [B, S, vocab], final-normed hidden states [B, S, hidden])."""
    out = model(tokens, position_ids=step.positions, attn_mask=step.attn_mask, cache=cache_layers(c_kv, k_pe, step))
    return out.logits, out.hidden_states


def mtp_forward(model, depth: int, h_prev: torch.Tensor, tokens: torch.Tensor, step: CacheStep, c_kv: torch.Tensor,
                k_pe: torch.Tensor, last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MTP module `depth` (1-based) over h_prev [B, S, hidden] and the tokens `depth` ahead [B, S], cached as `step`
    says in its own one-layer cache: (h [B, S, hidden], logits [B, vocab] at each row's position `last` [B])."""
    body = model.model
    mtp = body.mtp[depth - 1]
    cos, sin = body.rotary_emb(step.positions)
    h, _ = mtp(h_prev, body.embed_tokens(tokens), cos, sin, step.attn_mask, cache_layers(c_kv, k_pe, step)[0],
               tokens)
    h_last = h[torch.arange(h.shape[0], device=h.device), last]  # [B, hidden]
    return h, model.lm_head(mtp.shared_head["norm"](h_last))


class DecodeForwards:
    """`main` and `mtp`: the forwards above, compiled when `compile` is set (see the module docstring)."""

    def __init__(self, device: torch.device, compile: bool):
        self.compiled = compile
        self.static = compile and device.type == "cuda"
        self.compile_seconds = 0.0  # time spent in calls that compiled a new graph
        if compile:
            # Graphs per code object: main model (decode, verify) x (batch 1, batch > 1), and the MTP forward per
            # depth and width: more than torch's default limit of 8.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            mode = "reduce-overhead" if self.static else None
            options = dict(backend=BACKEND, mode=mode if BACKEND == "inductor" else None,
                           dynamic=None if self.static else True)
            self._main = torch.compile(main_forward, **options)
            self._mtp = torch.compile(mtp_forward, **options)
        else:
            self._main, self._mtp = main_forward, mtp_forward

    def batch(self, n: int) -> int | None:
        """The padded batch for n rows under CUDA graphs (a power of two), else None (no padding)."""
        return 1 << (n - 1).bit_length() if self.static else None

    def plan(self, step: CacheStep) -> CacheStep:
        """A step as the compiled forwards take it: slots as an index tensor only, no Python slice to guard on."""
        return replace(step, rows=None) if self.compiled else step

    def main(self, model, tokens, step, c_kv, k_pe):
        return self._timed(self._main, model, tokens, self.plan(step), c_kv, k_pe)

    def mtp(self, model, depth, h_prev, tokens, step, c_kv, k_pe, last):
        return self._timed(self._mtp, model, depth, h_prev, tokens, self.plan(step), c_kv, k_pe, last)

    def _timed(self, fn, *args):
        if not self.compiled:
            return fn(*args)
        before = _compiled_graphs()
        start = time.perf_counter()
        out = fn(*args)
        if _compiled_graphs() != before:
            self.compile_seconds += time.perf_counter() - start
        return out


def _compiled_graphs() -> int:
    """How many graphs dynamo has compiled in this process (to tell a compiling call from a cached one)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]
