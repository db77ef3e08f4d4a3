"""The cached forwards that decoding repeats every step, run eagerly or captured by torch.compile.

A decode step of a small model is a few hundred tiny operators: on a CPU its time is the per-operator overhead of
eager PyTorch, not arithmetic, and on a GPU it is kernel launches. `DecodeForwards` runs the forwards a decoding
step repeats — the main model over a few new tokens per slot (1 when decoding, 1 + drafts when verifying MTP
drafts), one MTP module over its draft positions, and the greedy MTP step that verifies, accepts and drafts in one
forward — either eagerly or compiled, so that the engine has one code path. Prefill, whose shapes change with every
prompt, always runs eagerly.

Compiled on CPU, the batch and context sizes are dynamic: one graph serves every context length, and a batch of one
and larger batches compile separately (torch specializes sizes 0 and 1). On CUDA the forwards are compiled with CUDA
graphs ("reduce-overhead"), which replay fixed shapes: there `static` is set, the engine pads the batch to a power of
two and each step reads every column of the cache (the mask hides the empty ones), so a handful of graphs cover a
whole run.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import replace

import torch

from .cache import CacheStep, cache_layers
from .sampling import greedy_tokens

COMPILE_CHOICES = ("auto", "on", "off")
BACKEND = "inductor"  # torch.compile's backend (tests swap in "aot_eager", which captures the same graphs faster)


# What this torch build offers (pyproject admits torch >= 2.6; these arrived later).
_HAS_ISOLATED_GUARD_SKIPPING = (hasattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe")
                                and "isolate_recompiles" in inspect.signature(torch.compile).parameters)
_SPECIALIZE_FLOATS = {"specialize_float": True} if hasattr(torch._dynamo.config, "specialize_float") else {}


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


def main_forward(model, tokens: torch.Tensor, step: CacheStep,
                 cache: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The model over tokens [B, S] placed by `step` in the cache tensors (`DecodeCache.tensors`: per layer, name ->
    [slots, len, width]): (logits [B, S, vocab], final-normed hidden states [B, S, hidden])."""
    out = model(tokens, position_ids=step.positions, attn_mask=step.attn_mask, cache=cache_layers(cache, step))
    return out.logits, out.hidden_states


def mtp_forward(model, depth: int, h_prev: torch.Tensor, tokens: torch.Tensor, step: CacheStep,
                cache: list[dict[str, torch.Tensor]], last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MTP module `depth` (1-based) over h_prev [B, S, hidden] and the tokens `depth` ahead [B, S], cached as `step`
    says in its own one-layer cache: (h [B, S, hidden], logits [B, vocab] at each row's position `last` [B])."""
    cos, sin = model.model.rotary_emb(step.positions)
    h, _ = model.mtp_forward(depth, h_prev, tokens, cos, sin, step.attn_mask, cache_layers(cache, step)[0])
    h_last = h[torch.arange(h.shape[0], device=h.device), last]  # [B, hidden]
    return h, model.mtp_logits(depth, h_last)


def greedy_speculative_forward(model, tokens: torch.Tensor, step: CacheStep, cache: list[dict[str, torch.Tensor]],
                               mtp_steps: list[CacheStep], mtp_caches: list[list[dict[str, torch.Tensor]]],
                               carry: torch.Tensor):
    """One greedy MTP step without leaving the device: verify, accept, and draft with every module.

    tokens [B, 1 + D] are each row's newest token t_L and its D drafts, at positions L .. L + D. The main model's
    argmax a_m there is the greedy t_{L+m+1}; a row accepts its first c drafts (those equal to a_0 .. a_{c-1}) and
    emits a_0 .. a_c, its new last kept position being P = L + c. Module k (trailing the main cache by k - 1
    positions, see speculative.py) then runs over positions L + 1 - k .. L + D, a fixed width D + k: its input state
    is the carried state at L + 1 - k followed by module k-1's outputs (the main model's for k = 1), its input token
    at position j is t_{j+k}, which is a_{j+k-L-1} up to t_{P+1} and the new draft of module j + k - P - 1 after,
    and its draft is its prediction at P. Positions past P are computed too (and overwritten by the next step), so
    no shape depends on c. `carry` [D, slots, hidden] is every module's state at its last kept position, by slot.

    Returns (a [B, 1 + D], c [B], new drafts [B, D], new carry [D, B, hidden]: module k's state at L + c + 1 - k).
    """
    logits, hidden = main_forward(model, tokens, step, cache)
    best = greedy_tokens(logits)  # [B, 1 + D]
    B, D = tokens.shape[0], tokens.shape[1] - 1
    accepted = (best[:, :D] == tokens[:, 1:]).long().cumprod(dim=1).sum(dim=1)  # c [B]
    rows = torch.arange(B, device=tokens.device)
    carry = carry.index_select(1, step.slots)
    drafts, carries, h = [], [], hidden
    for k in range(1, D + 1):
        i = torch.arange(D + k, device=tokens.device)[None, :]  # the input token of offset i is t_{L+1+i}
        ids = best.gather(1, i.clamp(max=D).expand(B, -1))
        if drafts:
            new = torch.stack(drafts, dim=1).gather(1, (i - accepted[:, None] - 1).clamp(0, k - 2))
            ids = torch.where(i <= accepted[:, None], ids, new)
        h_in = h if k == 1 else torch.cat([carry[k - 2][:, None], h], dim=1)
        h, draft_logits = mtp_forward(model, k, h_in, ids, mtp_steps[k - 1], mtp_caches[k - 1], accepted + k - 1)
        drafts.append(greedy_tokens(draft_logits))
        carries.append(h[rows, accepted])
    return best, accepted, torch.stack(drafts, dim=1), torch.stack(carries)


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
            self._main = torch.compile(main_forward, **self._compile_options())
            self._mtp = torch.compile(mtp_forward, **self._compile_options())
            self._speculative = torch.compile(greedy_speculative_forward, **self._compile_options())
        else:
            self._main, self._mtp, self._speculative = main_forward, mtp_forward, greedy_speculative_forward

    def _compile_options(self) -> dict:
        """torch.compile's arguments. Guards on the model's modules are skipped: checking them costs more than a
        whole compiled CPU step, and an engine never changes its model's structure (the weights are graph inputs,
        so training them in place is seen). So that a graph is never reused for another model, each engine's graphs
        live in their own cache region (isolate_recompiles). On CPU, inductor's C++ wrapper calls the kernels
        without the Python glue of its default wrapper (a third of a step's time at batch 1)."""
        options: dict = {}
        extra: dict = {}
        if _HAS_ISOLATED_GUARD_SKIPPING:  # torch >= 2.13; older builds keep the guards
            options["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
            # Without module guards, a graph break is unsafe, not just slow: dynamo then compiles the frame it
            # resumes in (DecoderBlock.forward, say) on its own, and with no guard on `self` a dense block's frame
            # ran for the MoE block (KeyError 'gate_proj', issue 24: an lru_cache'd CPU probe in the experts'
            # forward broke the graph). fullgraph makes any graph break a compile error naming its cause.
            extra["isolate_recompiles"] = True
            extra["fullgraph"] = True
        mode = None
        if BACKEND == "inductor":
            mode = "reduce-overhead" if self.static else None
            options["cpp_wrapper"] = not self.static
        return dict(backend=BACKEND, mode=mode, dynamic=None if self.static else True, options=options, **extra)

    def batch(self, n: int) -> int | None:
        """The padded batch for n rows under CUDA graphs (a power of two), else None (no padding)."""
        return 1 << (n - 1).bit_length() if self.static else None

    def plan(self, step: CacheStep) -> CacheStep:
        """A step as the compiled forwards take it: slots as an index tensor only, no Python slice to guard on."""
        return replace(step, rows=None) if self.compiled else step

    def main(self, model, tokens, step, cache):
        return self._timed(self._main, model, tokens, self.plan(step), cache)

    def mtp(self, model, depth, h_prev, tokens, step, cache, last, eager: bool = False):
        """mtp_forward; `eager` for drafting after a prefill chunk, whose shapes, like the prefill's, vary."""
        if eager:
            return mtp_forward(model, depth, h_prev, tokens, step, cache, last)
        return self._timed(self._mtp, model, depth, h_prev, tokens, self.plan(step), cache, last)

    def greedy_speculative(self, model, tokens, step, cache, mtp_steps, mtp_caches, carry):
        return self._timed(self._speculative, model, tokens, self.plan(step), cache,
                           [self.plan(s) for s in mtp_steps], mtp_caches, carry)

    def _timed(self, fn, *args):
        if not self.compiled:
            return fn(*args)
        before = _compiled_graphs()
        start = time.perf_counter()
        # Floats (norm epsilons, softmax scales) are constants of the model: as graph inputs (torch's default under
        # dynamic shapes) each call would wrap dozens of them in tensors.
        with torch._dynamo.config.patch(**_SPECIALIZE_FLOATS):
            out = fn(*args)
        if _compiled_graphs() != before:
            self.compile_seconds += time.perf_counter() - start
        return out


def _compiled_graphs() -> int:
    """How many graphs dynamo has compiled in this process (to tell a compiling call from a cached one)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]
