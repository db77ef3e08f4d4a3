"""The experts' math as one operator, `seekmoe::grouped_swiglu`: down( w * silu(gate) * up ) on token rows grouped
by expert, with a hand-written backward, in eager and compiled code alike (inside torch.compile it is opaque: the
ragged groups' sizes are data a traced graph cannot hold). The groups are laid out "ragged" (torch._grouped_mm) or
"padded" (torch.bmm); `gathered_swiglu` is the same math with each row's expert weights gathered, for decoding.
experts.py chooses between them (its module docstring has the table).

The backward saves only the rows and the gate/up pre-activations (besides the weights): the [rows, intermediate]
activation is recomputed from them, and the routing-weight gradient comes from the down projection's input
gradient (sum(dy * down(a)) = sum(down^T(dy) * a)), so the expert outputs are never saved either.
"""

from __future__ import annotations

import functools

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


def clamp_gate_up(gate: torch.Tensor, up: torch.Tensor, limit: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V4's clamped SwiGLU inputs: gate <= limit, up in [-limit, limit] (unchanged when limit is None)."""
    if limit is None:
        return gate, up
    return gate.clamp(max=limit), up.clamp(min=-limit, max=limit)


def _swiglu_forward(rows, weights, gate_up_proj, down_proj, groups, limit=None) -> tuple[torch.Tensor, torch.Tensor]:
    """down( w * silu(gate) * up ) on rows grouped as `groups` lays them out: (y [..., hidden], the gate/up
    pre-activations h [..., 2I] that the backward needs). rows [..., hidden], weights [...]; `limit` clamps gate
    and up first (clamp_gate_up)."""
    h = groups.linear(rows, gate_up_proj)  # [..., 2I]: each expert's gate columns, then its up columns
    gate, up = clamp_gate_up(*h.chunk(2, dim=-1), limit)
    a = F.silu(gate).mul_(up * weights.unsqueeze(-1))  # [..., I]: the product in fp32, stored as rows' dtype
    return groups.linear(a, down_proj), h  # [..., hidden]


def _swiglu_backward(dy, rows, weights, gate_up_proj, down_proj, h, groups, limit=None):
    """Gradients of _swiglu_forward's y for rows, weights, gate_up_proj and down_proj, recomputing the activation
    from h instead of having saved it (zero through the clamp where `limit` cut gate or up)."""
    dy = dy.contiguous()
    gate, up = clamp_gate_up(*h.chunk(2, dim=-1), limit)
    silu_gate = F.silu(gate)
    act = silu_gate * up  # [..., I] the activation before the routing weight
    w = weights.unsqueeze(-1)
    d_down = groups.linear_grad_weight(dy, (act * w).to(dy.dtype))
    d_weighted = groups.linear_grad_input(dy, down_proj)  # [..., I] gradient of w * act
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
    d_gate_up = groups.linear_grad_weight(dh, rows)
    d_rows = groups.linear_grad_input(dh, gate_up_proj)
    return d_rows, d_weights, d_gate_up, d_down


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
# Its backward is its own operator too, so that compiled graphs hold both as single nodes.
@torch.library.custom_op("seekmoe::grouped_swiglu", mutates_args=())
def grouped_swiglu(rows: torch.Tensor, weights: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                   offsets: torch.Tensor, layout: str = "ragged",
                   limit: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """down( w * silu(gate) * up ) for rows [M, hidden] grouped by expert with group ends `offsets` [E] and their
    routing weights [M] (fp32): (y [M, hidden], the gate/up pre-activations h [M, 2I] its backward reads). `limit`
    clamps gate and up (DeepSeek-V4's swiglu_limit; None: no clamp)."""
    if layout == "ragged":
        return _swiglu_forward(rows, weights, gate_up_proj, down_proj, _RaggedGroups(offsets), limit)
    padded_rows, padded_weights, slot = _pad_groups(rows, weights, offsets)
    y, h = _swiglu_forward(padded_rows, padded_weights, gate_up_proj, down_proj, _PaddedGroups(), limit)
    return tuple(t.reshape(-1, t.shape[-1]).index_select(0, slot) for t in (y, h))


@grouped_swiglu.register_fake
def _(rows, weights, gate_up_proj, down_proj, offsets, layout="ragged", limit=None):
    return rows.new_empty(rows.shape[0], down_proj.shape[1]), rows.new_empty(rows.shape[0], gate_up_proj.shape[1])


@torch.library.custom_op("seekmoe::grouped_swiglu_backward", mutates_args=())
def grouped_swiglu_backward(dy: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, gate_up_proj: torch.Tensor,
                            down_proj: torch.Tensor, h: torch.Tensor, offsets: torch.Tensor, layout: str = "ragged",
                            limit: float | None = None,
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of grouped_swiglu's y for rows, weights, gate_up_proj and down_proj."""
    if layout == "ragged":
        return _swiglu_backward(dy, rows, weights, gate_up_proj, down_proj, h, _RaggedGroups(offsets), limit)
    padded_rows, padded_weights, slot = _pad_groups(rows, weights, offsets)
    E = gate_up_proj.shape[0]

    def pad(t):  # [M, n] -> [E, capacity, n], zero rows where no row lands
        return t.new_zeros(padded_rows.shape[0] * padded_rows.shape[1], t.shape[-1]).index_copy(0, slot, t).view(
            E, -1, t.shape[-1])

    d_rows, d_weights, d_gate_up, d_down = _swiglu_backward(pad(dy), padded_rows, padded_weights, gate_up_proj,
                                                            down_proj, pad(h), _PaddedGroups(), limit)
    return (d_rows.reshape(-1, rows.shape[1]).index_select(0, slot), d_weights.reshape(-1).index_select(0, slot),
            d_gate_up, d_down)


@grouped_swiglu_backward.register_fake
def _(dy, rows, weights, gate_up_proj, down_proj, h, offsets, layout="ragged", limit=None):
    return torch.empty_like(rows), torch.empty_like(weights), torch.empty_like(gate_up_proj), torch.empty_like(down_proj)


def _setup_context(ctx, inputs, output):
    # Only the rows and the gate/up pre-activations (plus the weights it multiplies by) are kept for the backward:
    # the [M, I] activation is recomputed from h, and the routing-weight gradient comes from the down projection's
    # input gradient (sum(dy * down(a)) = sum(down^T(dy) * a)), so the expert outputs are never saved either.
    rows, weights, gate_up_proj, down_proj, offsets, layout, limit = inputs
    ctx.layout, ctx.limit = layout, limit
    ctx.save_for_backward(rows, weights, gate_up_proj, down_proj, output[1], offsets)


def _backward(ctx, dy, dh):
    return *grouped_swiglu_backward(dy, *ctx.saved_tensors, ctx.layout, ctx.limit), None, None, None


grouped_swiglu.register_autograd(_backward, setup_context=_setup_context)


def gathered_swiglu(rows: torch.Tensor, weights: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                     expert: torch.Tensor, limit: float | None = None) -> torch.Tensor:
    """grouped_swiglu's y with each row's expert weights gathered: rows [M, hidden], weights [M], expert [M]
    -> [M, hidden]. No ragged groups and no host synchronization, so its shapes depend on M alone."""
    dtype = rows.dtype  # the weights may be stored narrower: only the gathered ones are converted
    h = torch.bmm(gate_up_proj.index_select(0, expert).to(dtype), rows.unsqueeze(-1)).squeeze(-1)  # [M, 2I]
    gate, up = clamp_gate_up(*h.chunk(2, dim=-1), limit)
    a = F.silu(gate) * (up * weights.unsqueeze(-1))  # [M, I]
    return torch.bmm(down_proj.index_select(0, expert).to(dtype), a.to(dtype).unsqueeze(-1)).squeeze(-1)
