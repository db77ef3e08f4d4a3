"""The experts' math as one operator, `seekmoe::grouped_swiglu`: down( w * silu(gate) * up ) on token rows grouped
by expert, with a hand-written backward, in eager and compiled code alike (inside torch.compile it is opaque: the
ragged groups' sizes are data a traced graph cannot hold). The groups are laid out "ragged" (torch._grouped_mm) or
"padded" (torch.bmm); `gathered_swiglu` is the same math with each row's expert weights gathered, for decoding.
experts.py chooses between them (its module docstring has the table).

The backward saves only the rows and the gate/up pre-activations (besides the weights): the [rows, intermediate]
activation is recomputed from them, and the routing-weight gradient comes from the down projection's input
gradient (sum(dy * down(a)) = sum(down^T(dy) * a)), so the expert outputs are never saved either.

Low-rank deltas (one LoRA adapter per expert, `LowRankFactors`) run through the same grouped products, never formed as
W + B A: h = x W^T + s (x A^T) B^T for gate/up and likewise for down on the weighted activation, so their cost scales
with the rows times the rank. The base weights' gradients are skipped when autograd does not need them (a frozen base).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=None)
def grouped_mm_supported(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm runs here, in the three layouts the operator uses, for this device and dtype.

    The probe runs without autograd: it may first run inside a checkpointed forward, where any tensor it saved for
    backward would break activation checkpointing.
    """
    if not hasattr(torch, "_grouped_mm") or device_type not in ("cpu", "cuda"):
        return False
    if device_type == "cuda" and not torch.cuda.is_available():
        return False
    try:
        with torch.no_grad():
            groups = _RaggedGroups(torch.tensor([8, 16], device=device_type, dtype=torch.int32))
            a = torch.ones(16, 16, device=device_type, dtype=dtype)
            w = torch.ones(2, 16, 16, device=device_type, dtype=dtype)
            groups.linear(a, w), groups.linear_grad_input(a, w), groups.linear_grad_weight(a, a)
        return True
    except (RuntimeError, NotImplementedError):
        return False


class _RaggedGroups:
    """Group g is rows offsets[g-1]:offsets[g] of a [rows, features] tensor (torch._grouped_mm's layout)."""

    def __init__(self, offsets: torch.Tensor):
        self.offsets = offsets

    def linear(self, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """a_g @ w_g^T per group: a [M, in], w [E, out, in] -> [M, out]."""
        return torch._grouped_mm(a, w.transpose(1, 2), offs=self.offsets)

    def linear_grad_input(self, g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """g_g @ w_g: g [M, out], w [E, out, in] -> [M, in]."""
        return torch._grouped_mm(g, w, offs=self.offsets)

    def linear_grad_weight(self, g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """g_g^T @ a_g: g [M, out], a [M, in] -> [E, out, in] (zero for an empty group)."""
        return torch._grouped_mm(g.t(), a, offs=self.offsets)


class _PaddedGroups:
    """Group g is row block g of an [E, capacity, features] tensor, padded with zero rows (torch.bmm's layout)."""

    def linear(self, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.bmm(a, w.transpose(1, 2))

    def linear_grad_input(self, g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.bmm(g, w)

    def linear_grad_weight(self, g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return torch.bmm(g.transpose(1, 2), a)


@dataclass(frozen=True)
class LowRankFactors:
    """Stacked per-expert low-rank deltas of both expert weights: W_e + scaling * B_e @ A_e, with gate_up_A
    [E, r, hidden], gate_up_B [E, 2I, r], down_A [E, r, I], down_B [E, hidden, r] (E: the experts computed here)."""

    gate_up_A: torch.Tensor
    gate_up_B: torch.Tensor
    down_A: torch.Tensor
    down_B: torch.Tensor
    scaling: float

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate_up_A, gate_up_B, down_A, down_B)."""
        return self.gate_up_A, self.gate_up_B, self.down_A, self.down_B

    def to(self, dtype: torch.dtype) -> "LowRankFactors":
        """The factors in `dtype`."""
        return LowRankFactors(*(t.to(dtype) for t in self.tensors()), self.scaling)

    def select(self, first: int, n: int) -> "LowRankFactors":
        """Experts first .. first + n - 1 (expert parallelism computes a slice of the experts)."""
        if first == 0 and n == self.gate_up_A.shape[0]:
            return self
        return LowRankFactors(*(t[first:first + n] for t in self.tensors()), self.scaling)

    def delta(self, name: str) -> torch.Tensor:
        """scaling * B @ A [E, out, in] for 'gate_up_proj' or 'down_proj': what merging into the weight adds."""
        a, b = (self.gate_up_A, self.gate_up_B) if name == "gate_up_proj" else (self.down_A, self.down_B)
        return torch.bmm(b, a) * self.scaling


def _rank_padded(factors: tuple, layout: str) -> tuple:
    """(A, B, A, B) with the rank padded by zeros to a 16-byte row stride where torch._grouped_mm needs it (the
    ragged layout): zero rows of A and columns of B add nothing and receive gradients that are cut off."""
    r, size = factors[0].shape[1], factors[0].dtype.itemsize
    if layout != "ragged" or r * size % 16 == 0:
        return factors
    pad = -(-r * size // 16) * 16 // size - r
    a1, b1, a2, b2 = factors
    return F.pad(a1, (0, 0, 0, pad)), F.pad(b1, (0, pad)), F.pad(a2, (0, 0, 0, pad)), F.pad(b2, (0, pad))


def clamp_gate_up(gate: torch.Tensor, up: torch.Tensor, limit: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V4's clamped SwiGLU inputs: gate <= limit, up in [-limit, limit] (unchanged when limit is None)."""
    if limit is None:
        return gate, up
    return gate.clamp(max=limit), up.clamp(min=-limit, max=limit)


def _swiglu_forward(rows, weights, gate_up_proj, down_proj, groups, limit=None, lora=None, scaling=1.0
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """down( w * silu(gate) * up ) on rows grouped as `groups` lays them out: (y [..., hidden], the gate/up
    pre-activations h [..., 2I] that the backward needs). rows [..., hidden], weights [...]; `limit` clamps gate
    and up first (clamp_gate_up); `lora` (gate_up_A, gate_up_B, down_A, down_B) adds scaling * B(A(input)) to each
    projection through the same groups."""
    h = groups.linear(rows, gate_up_proj)  # [..., 2I]: each expert's gate columns, then its up columns
    if lora is not None:
        h = h.add_(groups.linear(groups.linear(rows, lora[0]), lora[1]), alpha=scaling)
    gate, up = clamp_gate_up(*h.chunk(2, dim=-1), limit)
    a = F.silu(gate).mul_(up * weights.unsqueeze(-1))  # [..., I]: the product in fp32, stored as rows' dtype
    y = groups.linear(a, down_proj)  # [..., hidden]
    if lora is not None:  # down is linear: its delta on w * act is w times its delta on act
        y = y.add_(groups.linear(groups.linear(a, lora[2]), lora[3]), alpha=scaling)
    return y, h


def _swiglu_backward(dy, rows, weights, gate_up_proj, down_proj, h, groups, limit=None, lora=None, scaling=1.0,
                     weight_grads=True):
    """Gradients of _swiglu_forward's y for rows, weights, gate_up_proj and down_proj (None for the last two unless
    `weight_grads`), and, with `lora`, its four factors (else None), recomputing the activation from h instead of
    having saved it (zero through the clamp where `limit` cut gate or up)."""
    dy = dy.contiguous()
    gate, up = clamp_gate_up(*h.chunk(2, dim=-1), limit)
    silu_gate = F.silu(gate)
    act = silu_gate * up  # [..., I] the activation before the routing weight
    w = weights.unsqueeze(-1)
    weighted = (act * w).to(dy.dtype)  # down's input
    d_down = groups.linear_grad_weight(dy, weighted) if weight_grads else None
    d_weighted = groups.linear_grad_input(dy, down_proj)  # [..., I] gradient of w * act
    d_lora = None
    if lora is not None:  # y += s * (weighted A^T) B^T: the rank-wide v = weighted A^T is recomputed, not saved
        a_up, b_up, a_down, b_down = lora
        dv = groups.linear_grad_input(dy, b_down).mul_(scaling)  # [..., r]
        d_b_down = groups.linear_grad_weight(dy, groups.linear(weighted, a_down)).mul_(scaling)
        d_a_down = groups.linear_grad_weight(dv, weighted)
        d_weighted.add_(groups.linear_grad_input(dv, a_down))
    del weighted
    d_weights = (d_weighted.float() * act.float()).sum(-1)  # fp32, as the weights are
    d_act = d_weighted.mul_(w)
    dh = torch.empty_like(h)
    d_gate, d_up = dh.chunk(2, dim=-1)
    torch.mul(d_act, silu_gate, out=d_up)
    torch.ops.aten.silu_backward.grad_input(d_act.mul_(up), gate, grad_input=d_gate)
    if limit is not None:  # clamp's gradient: through where the value was inside the bounds
        h_gate, h_up = h.chunk(2, dim=-1)
        d_gate.mul_(h_gate <= limit)
        d_up.mul_(h_up.abs() <= limit)
    d_gate_up = groups.linear_grad_weight(dh, rows) if weight_grads else None
    d_rows = groups.linear_grad_input(dh, gate_up_proj)
    if lora is not None:  # h += s * (rows A^T) B^T
        du = groups.linear_grad_input(dh, b_up).mul_(scaling)  # [..., r]
        d_b_up = groups.linear_grad_weight(dh, groups.linear(rows, a_up)).mul_(scaling)
        d_a_up = groups.linear_grad_weight(du, rows)
        d_rows.add_(groups.linear_grad_input(du, a_up))
        d_lora = (d_a_up, d_b_up, d_a_down, d_b_down)
    return d_rows, d_weights, d_gate_up, d_down, d_lora


def _pad_groups(rows: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor):
    """Rows grouped by expert (group ends `offsets` [E]) -> ([E, capacity, hidden], [E, capacity], the flat padded
    index of each row [M])."""
    E, M = offsets.shape[0], rows.shape[0]
    counts = torch.diff(offsets.long(), prepend=offsets.new_zeros(1).long())
    expert = torch.repeat_interleave(torch.arange(E, device=rows.device), counts, output_size=M)
    capacity = max(int(counts.max()), 1) if M else 1  # the one host synchronization of this layout
    rank = torch.arange(M, device=rows.device) - (offsets.long() - counts)[expert]
    slot = expert * capacity + rank  # [M] position of each row in the padded [E * capacity] rows
    padded_rows = rows.new_zeros(E * capacity, rows.shape[1]).index_copy(0, slot, rows)
    padded_weights = weights.new_zeros(E * capacity).index_copy(0, slot, weights)
    return padded_rows.view(E, capacity, -1), padded_weights.view(E, capacity), slot


# The one experts operator. `layout` is "ragged" (torch._grouped_mm) or "padded" (torch.bmm), fixed by the backend.
# Its backward is its own operator too, so that compiled graphs hold both as single nodes. The four optional factors
# are LowRankFactors' tensors (all or none), `lora_scaling` its scaling.
@torch.library.custom_op("seekmoe::grouped_swiglu", mutates_args=())
def grouped_swiglu(rows: torch.Tensor, weights: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                   offsets: torch.Tensor, layout: str = "ragged", limit: float | None = None,
                   gate_up_A: torch.Tensor | None = None, gate_up_B: torch.Tensor | None = None,
                   down_A: torch.Tensor | None = None, down_B: torch.Tensor | None = None,
                   lora_scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """down( w * silu(gate) * up ) for rows [M, hidden] grouped by expert with group ends `offsets` [E] and their
    routing weights [M] (fp32): (y [M, hidden], the gate/up pre-activations h [M, 2I] its backward reads). `limit`
    clamps gate and up (DeepSeek-V4's swiglu_limit; None: no clamp); gate_up_A .. down_B (LowRankFactors' tensors)
    add each expert's low-rank delta, lora_scaling * B(A(input)), to both projections without forming it."""
    lora = _lora_args(gate_up_A, gate_up_B, down_A, down_B, layout)
    if layout == "ragged":
        return _swiglu_forward(rows, weights, gate_up_proj, down_proj, _RaggedGroups(offsets), limit, lora,
                               lora_scaling)
    padded_rows, padded_weights, slot = _pad_groups(rows, weights, offsets)
    y, h = _swiglu_forward(padded_rows, padded_weights, gate_up_proj, down_proj, _PaddedGroups(), limit, lora,
                           lora_scaling)
    return tuple(t.reshape(-1, t.shape[-1]).index_select(0, slot) for t in (y, h))


def _lora_args(gate_up_A, gate_up_B, down_A, down_B, layout):
    factors = (gate_up_A, gate_up_B, down_A, down_B)
    if all(f is None for f in factors):
        return None
    if any(f is None for f in factors):
        raise ValueError("grouped_swiglu: the low-rank factors gate_up_A, gate_up_B, down_A, down_B come all or none")
    return _rank_padded(factors, layout)


@grouped_swiglu.register_fake
def _(rows, weights, gate_up_proj, down_proj, offsets, layout="ragged", limit=None, gate_up_A=None, gate_up_B=None,
      down_A=None, down_B=None, lora_scaling=1.0):
    return rows.new_empty(rows.shape[0], down_proj.shape[1]), rows.new_empty(rows.shape[0], gate_up_proj.shape[1])


@torch.library.custom_op("seekmoe::grouped_swiglu_backward", mutates_args=())
def grouped_swiglu_backward(dy: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, gate_up_proj: torch.Tensor,
                            down_proj: torch.Tensor, h: torch.Tensor, offsets: torch.Tensor, layout: str = "ragged",
                            limit: float | None = None, gate_up_A: torch.Tensor | None = None,
                            gate_up_B: torch.Tensor | None = None, down_A: torch.Tensor | None = None,
                            down_B: torch.Tensor | None = None, lora_scaling: float = 1.0, weight_grads: bool = True,
                            ) -> list[torch.Tensor]:
    """Gradients of grouped_swiglu's y for rows, weights, gate_up_proj and down_proj (empty [0] tensors for the
    last two unless `weight_grads`: a frozen base needs none), then for the four factors when given."""
    lora = _lora_args(gate_up_A, gate_up_B, down_A, down_B, layout)
    if layout == "ragged":
        d_rows, d_weights, d_gate_up, d_down, d_lora = _swiglu_backward(
            dy, rows, weights, gate_up_proj, down_proj, h, _RaggedGroups(offsets), limit, lora, lora_scaling,
            weight_grads)
    else:
        padded_rows, padded_weights, slot = _pad_groups(rows, weights, offsets)
        E = gate_up_proj.shape[0]

        def pad(t):  # [M, n] -> [E, capacity, n], zero rows where no row lands
            return t.new_zeros(padded_rows.shape[0] * padded_rows.shape[1], t.shape[-1]).index_copy(0, slot, t).view(
                E, -1, t.shape[-1])

        d_rows, d_weights, d_gate_up, d_down, d_lora = _swiglu_backward(
            pad(dy), padded_rows, padded_weights, gate_up_proj, down_proj, pad(h), _PaddedGroups(), limit, lora,
            lora_scaling, weight_grads)
        d_rows, d_weights = d_rows.reshape(-1, rows.shape[1]).index_select(0, slot), d_weights.reshape(-1)[slot]
    out = [d_rows, d_weights, *(d if d is not None else w.new_empty(0) for d, w in ((d_gate_up, gate_up_proj),
                                                                                    (d_down, down_proj)))]
    if d_lora is not None:  # cut the rank padding off (_rank_padded)
        r = gate_up_A.shape[1]
        out += [d_lora[0][:, :r], d_lora[1][..., :r], d_lora[2][:, :r], d_lora[3][..., :r]]
    return out


@grouped_swiglu_backward.register_fake
def _(dy, rows, weights, gate_up_proj, down_proj, h, offsets, layout="ragged", limit=None, gate_up_A=None,
      gate_up_B=None, down_A=None, down_B=None, lora_scaling=1.0, weight_grads=True):
    out = [torch.empty_like(rows), torch.empty_like(weights)]
    out += [torch.empty_like(w) if weight_grads else w.new_empty(0) for w in (gate_up_proj, down_proj)]
    if gate_up_A is not None:
        out += [torch.empty_like(f) for f in (gate_up_A, gate_up_B, down_A, down_B)]
    return out


def _setup_context(ctx, inputs, output):
    # Only the rows and the gate/up pre-activations (plus the weights it multiplies by) are kept for the backward:
    # the [M, I] activation is recomputed from h, and the routing-weight gradient comes from the down projection's
    # input gradient (sum(dy * down(a)) = sum(down^T(dy) * a)), so the expert outputs are never saved either. The
    # adapters' rank-wide intermediates are recomputed too.
    rows, weights, gate_up_proj, down_proj, offsets, layout, limit, a1, b1, a2, b2, scaling = inputs
    ctx.layout, ctx.limit, ctx.scaling, ctx.lora = layout, limit, scaling, a1 is not None
    ctx.save_for_backward(rows, weights, gate_up_proj, down_proj, output[1], offsets, a1, b1, a2, b2)


def _backward(ctx, dy, dh):
    rows, weights, gate_up_proj, down_proj, h, offsets, *factors = ctx.saved_tensors
    weight_grads = bool(ctx.needs_input_grad[2] or ctx.needs_input_grad[3])
    grads = grouped_swiglu_backward(dy, rows, weights, gate_up_proj, down_proj, h, offsets, ctx.layout, ctx.limit,
                                    *factors, ctx.scaling, weight_grads)
    d_rows, d_weights, d_gate_up, d_down = grads[:4]
    if not weight_grads:
        d_gate_up = d_down = None
    d_lora = grads[4:] if ctx.lora else [None] * 4
    return d_rows, d_weights, d_gate_up, d_down, None, None, None, *d_lora, None


grouped_swiglu.register_autograd(_backward, setup_context=_setup_context)


def gathered_swiglu(rows: torch.Tensor, weights: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                    expert: torch.Tensor, limit: float | None = None,
                    low_rank: LowRankFactors | None = None) -> torch.Tensor:
    """grouped_swiglu's y with each row's expert weights gathered: rows [M, hidden], weights [M], expert [M]
    -> [M, hidden]. No ragged groups and no host synchronization, so its shapes depend on M alone. `low_rank` adds
    each row's expert's delta on the rank-wide path (its factors gathered too)."""
    dtype = rows.dtype  # the weights may be stored narrower: only the gathered ones are converted

    def project(w, x, a=None, b=None):  # [M, in] -> [M, out] through each row's expert (and its delta)
        y = torch.bmm(w.index_select(0, expert).to(dtype), x.unsqueeze(-1))
        if a is not None:
            u = torch.bmm(a.index_select(0, expert).to(dtype), x.unsqueeze(-1))  # [M, r, 1]
            y = y + torch.bmm(b.index_select(0, expert).to(dtype), u) * low_rank.scaling
        return y.squeeze(-1)

    lr = low_rank.tensors() if low_rank is not None else (None,) * 4
    h = project(gate_up_proj, rows, *lr[:2])  # [M, 2I]
    gate, up = clamp_gate_up(*h.chunk(2, dim=-1), limit)
    a = F.silu(gate) * (up * weights.unsqueeze(-1))  # [M, I]
    return project(down_proj, a.to(dtype), *lr[2:])
