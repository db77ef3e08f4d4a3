"""Routed experts: E SwiGLU experts stored as stacked [E, ...] weights, run as grouped GEMMs on dispatched tokens.

Each expert e computes  y = down_e( w * silu(gate_e(x)) * up_e(x) )  for the token rows routed to it, w being the
row's routing weight (applied to the moe_intermediate_size-wide activation, which is narrower than hidden in
DeepSeek's shapes). The rows arrive grouped by expert (see dispatch.py), so the three projections are grouped
matrix products. Two backends compute them:

- "grouped_mm": torch._grouped_mm on the ragged groups (CPU in fp32/bf16, and CUDA);
- "padded_bmm": the groups padded to the largest one and multiplied by torch.bmm (any build; costs one host
  synchronization to learn the padded size);
- "gathered": each row multiplied by its own expert's weights, gathered per row (inference only). It reads one
  expert's weights per row, so it pays when there are fewer rows than experts: decoding, where it also has static
  shapes (no ragged groups, no host synchronization) and so compiles into one graph.

The default is "gathered" without autograd for fewer rows than experts (or inside torch.compile), else "grouped_mm" where this build runs it
for the device and dtype, else "padded_bmm". Override it per module (`RoutedExperts.backend`) or for the process
(`SEEKMOE_EXPERTS_BACKEND`).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn

from .dispatch import DispatchPlan

BACKENDS = ("grouped_mm", "padded_bmm", "gathered")
BACKEND_ENV = "SEEKMOE_EXPERTS_BACKEND"


@functools.lru_cache(maxsize=None)
def grouped_mm_supported(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm runs here, in the three layouts GroupedSwiGLU uses, for this device and dtype.

    The probe runs without autograd (the Function's backward calls _grouped_mm itself): it may first run inside a
    checkpointed forward, where any tensor it saved for backward would break activation checkpointing.
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


@functools.lru_cache(maxsize=None)
def _cpu_has_bf16_matmul() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def grouped_mm_fits(hidden: int, intermediate: int, dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm takes these expert shapes: it needs every row stride a multiple of 16 bytes."""
    return all(d * dtype.itemsize % 16 == 0 for d in (hidden, intermediate))


def gemm_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype the expert GEMMs run in for activations of `dtype`: fp32 instead of bf16 on a CPU without bf16
    matrix instructions (AVX512-BF16 or AMX), where torch's bf16 matmuls run several times slower than fp32 ones
    (fp32 arithmetic on bf16 inputs is also at least as exact)."""
    if dtype == torch.bfloat16 and device.type == "cpu" and not _cpu_has_bf16_matmul():
        return torch.float32
    return dtype


def resolve_backend(requested: str | None, device: torch.device, dtype: torch.dtype, rows: int = 0,
                    n_experts: int = 0, aligned: bool = True) -> str:
    """The backend to run for `rows` dispatched rows over `n_experts` local experts: `requested`, else
    $SEEKMOE_EXPERTS_BACKEND, else the fastest this build supports."""
    name = requested or os.environ.get(BACKEND_ENV) or None
    if name == "gathered" and torch.is_grad_enabled():
        name = None  # it has no backward: training takes the automatic choice
    if name is None:
        # Compiled inference takes it at every size: its shapes are static, where the others need a host sync.
        if not torch.is_grad_enabled() and (rows < n_experts or torch.compiler.is_compiling()):
            return "gathered"
        # Compiled training runs the experts as one opaque operator (see grouped_swiglu).
        if torch.compiler.is_compiling():
            return "compiled_op"
        return "grouped_mm" if aligned and grouped_mm_supported(device.type, dtype) else "padded_bmm"
    if name not in BACKENDS:
        raise ValueError(f"unknown routed-experts backend {name!r}: expected one of {BACKENDS} "
                         f"(set by RoutedExperts.backend or ${BACKEND_ENV})")
    return name


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


def _swiglu_forward(rows, weights, gate_up_proj, down_proj, groups) -> tuple[torch.Tensor, torch.Tensor]:
    """down( w * silu(gate) * up ) on rows grouped as `groups` lays them out: (y [..., hidden], the gate/up
    pre-activations h [..., 2I] that the backward needs). rows [..., hidden], weights [...]."""
    h = groups.linear(rows, gate_up_proj)  # [..., 2I]: each expert's gate columns, then its up columns
    gate, up = h.chunk(2, dim=-1)
    a = F.silu(gate).mul_(up * weights.unsqueeze(-1))  # [..., I]: the product in fp32, stored as rows' dtype
    return groups.linear(a, down_proj), h  # [..., hidden]


def _swiglu_backward(dy, rows, weights, gate_up_proj, down_proj, h, groups):
    """Gradients of _swiglu_forward's y for rows, weights, gate_up_proj and down_proj, recomputing the activation
    from h instead of having saved it."""
    dy = dy.contiguous()
    gate, up = h.chunk(2, dim=-1)
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
    d_gate_up = groups.linear_grad_weight(dh, rows)
    d_rows = groups.linear_grad_input(dh, gate_up_proj)
    return d_rows, d_weights, d_gate_up, d_down


class GroupedSwiGLU(torch.autograd.Function):
    """The experts' math on rows grouped by expert: down( w * silu(gate) * up ), with a hand-written backward.

    It saves only the input rows and the gate/up pre-activations, and recomputes the [rows, intermediate]
    activation in the backward instead of keeping it; the routing-weight gradient comes from the down projection's
    input gradient (sum(dy * down(a)) = sum(down^T(dy) * a)), so the expert outputs are never saved either.
    """

    @staticmethod
    def forward(ctx, rows, weights, gate_up_proj, down_proj, groups):
        y, h = _swiglu_forward(rows, weights, gate_up_proj, down_proj, groups)
        ctx.save_for_backward(rows, weights, gate_up_proj, down_proj, h)
        ctx.groups = groups
        return y

    @staticmethod
    def backward(ctx, dy):
        return *_swiglu_backward(dy, *ctx.saved_tensors, ctx.groups), None


# Inside torch.compile the experts run as one opaque operator: the ragged groups' sizes are data, which a traced
# graph cannot hold (padded_bmm would break the graph at its host synchronization), and the fake-tensor rule of
# torch._grouped_mm accepts bf16 only. The operator runs the same grouped GEMMs eagerly, with the same backward.
def _ragged_or_padded(rows, weights, offsets, intermediate: int):
    """The groups to run `offsets`' rows in: ragged where _grouped_mm runs, else padded (with the index mapping
    padded rows back)."""
    if grouped_mm_supported(rows.device.type, rows.dtype) and grouped_mm_fits(rows.shape[1], intermediate,
                                                                                rows.dtype):
        return rows, weights, _RaggedGroups(offsets), None
    counts = torch.diff(offsets.long(), prepend=offsets.new_zeros(1).long())
    expert = torch.repeat_interleave(torch.arange(len(counts), device=rows.device), counts)
    plan = DispatchPlan(token=expert, expert=expert, counts=counts, offsets=offsets, n_tokens=rows.shape[0])
    padded_rows, padded_weights, slot = _pad_groups(rows, weights, plan)
    return padded_rows, padded_weights, _PaddedGroups(), slot


@torch.library.custom_op("seekmoe::grouped_swiglu", mutates_args=())
def grouped_swiglu(rows: torch.Tensor, weights: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                   offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """_swiglu_forward for rows [M, hidden] grouped by expert with group ends `offsets` [E]: (y, h)."""
    rows_, weights_, groups, slot = _ragged_or_padded(rows, weights, offsets, down_proj.shape[2])
    y, h = _swiglu_forward(rows_, weights_, gate_up_proj, down_proj, groups)
    if slot is not None:
        y, h = (t.reshape(-1, t.shape[-1]).index_select(0, slot) for t in (y, h))
    return y, h


@grouped_swiglu.register_fake
def _(rows, weights, gate_up_proj, down_proj, offsets):
    return rows.new_empty(rows.shape[0], down_proj.shape[1]), rows.new_empty(rows.shape[0], gate_up_proj.shape[1])


@torch.library.custom_op("seekmoe::grouped_swiglu_backward", mutates_args=())
def grouped_swiglu_backward(dy: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, gate_up_proj: torch.Tensor,
                            down_proj: torch.Tensor, h: torch.Tensor, offsets: torch.Tensor,
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """_swiglu_backward for grouped_swiglu."""
    rows_, weights_, groups, slot = _ragged_or_padded(rows, weights, offsets, down_proj.shape[2])
    if slot is None:
        return _swiglu_backward(dy, rows, weights, gate_up_proj, down_proj, h, groups)
    E = gate_up_proj.shape[0]
    pad = lambda t: t.new_zeros(rows_.shape[0] * rows_.shape[1], t.shape[-1]).index_copy(0, slot, t).view(  # noqa
        E, -1, t.shape[-1])
    d_rows, d_weights, d_gate_up, d_down = _swiglu_backward(pad(dy), rows_, weights_, gate_up_proj, down_proj,
                                                            pad(h), groups)
    return (d_rows.reshape(-1, rows.shape[1]).index_select(0, slot), d_weights.reshape(-1).index_select(0, slot),
            d_gate_up, d_down)


@grouped_swiglu_backward.register_fake
def _(dy, rows, weights, gate_up_proj, down_proj, h, offsets):
    return torch.empty_like(rows), torch.empty_like(weights), torch.empty_like(gate_up_proj), torch.empty_like(down_proj)


def _setup_context(ctx, inputs, output):
    rows, weights, gate_up_proj, down_proj, offsets = inputs
    ctx.save_for_backward(rows, weights, gate_up_proj, down_proj, output[1], offsets)


def _backward(ctx, dy, dh):
    return *grouped_swiglu_backward(dy, *ctx.saved_tensors), None


grouped_swiglu.register_autograd(_backward, setup_context=_setup_context)


def _pad_groups(rows: torch.Tensor, weights: torch.Tensor, plan: DispatchPlan):
    """Rows grouped by expert -> ([E, capacity, hidden], [E, capacity], the flat padded index of each row)."""
    E, M = plan.counts.shape[0], rows.shape[0]
    capacity = max(int(plan.counts.max()), 1) if M else 1  # the one host synchronization of this backend
    rank = torch.arange(M, device=rows.device) - (plan.offsets.long() - plan.counts)[plan.expert]
    slot = plan.expert * capacity + rank  # [M] position of each row in the padded [E * capacity] rows
    padded_rows = rows.new_zeros(E * capacity, rows.shape[1]).index_copy(0, slot, rows)
    padded_weights = weights.new_zeros(E * capacity).index_copy(0, slot, weights)
    return padded_rows.view(E, capacity, -1), padded_weights.view(E, capacity), slot


def _gathered_swiglu(rows: torch.Tensor, weights: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                     expert: torch.Tensor) -> torch.Tensor:
    """GroupedSwiGLU's forward with each row's expert weights gathered: rows [M, hidden], weights [M], expert [M]
    -> [M, hidden]. No ragged groups and no host synchronization, so its shapes depend on M alone."""
    h = torch.bmm(gate_up_proj.index_select(0, expert), rows.unsqueeze(-1)).squeeze(-1)  # [M, 2I]
    gate, up = h.chunk(2, dim=-1)
    a = F.silu(gate) * (up * weights.unsqueeze(-1))  # [M, I]
    return torch.bmm(down_proj.index_select(0, expert), a.to(rows.dtype).unsqueeze(-1)).squeeze(-1)


class RoutedExperts(nn.Module):
    """E SwiGLU experts. gate_up_proj [E, 2*moe_intermediate_size, hidden] holds each expert's gate rows then its
    up rows; down_proj [E, hidden, moe_intermediate_size]. `backend` (None = automatic) picks the grouped GEMM."""

    def __init__(self, n_experts: int, hidden_size: int, intermediate_size: int, backend: str | None = None):
        super().__init__()
        self.n_experts = n_experts
        self.intermediate_size = intermediate_size
        self.backend = backend
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden_size, intermediate_size))

    def expert_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up_proj, down_proj) of the experts this module computes; expert parallelism (parallel/) returns
        the local shards of its distributed weights here."""
        return self.gate_up_proj, self.down_proj

    def forward(self, rows: torch.Tensor, weights: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """Each dispatched row through its expert, scaled by its routing weight: rows [M, hidden] grouped by
        expert as `plan` says, weights [M] -> [M, hidden]."""
        device_type = rows.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else rows.dtype
        compute = gemm_dtype(rows.device, dtype)
        # The routing weights stay fp32 until they multiply the experts' activations (DeepSeek-V3 keeps its gating
        # in fp32); only the products enter the low-precision down projection.
        rows, weights = rows.to(compute), weights.float()
        gate_up_proj, down_proj = (w.to(compute) for w in self.expert_weights())
        backend = resolve_backend(self.backend, rows.device, compute, rows.shape[0], gate_up_proj.shape[0],
                                  grouped_mm_fits(rows.shape[1], down_proj.shape[2], compute))
        with torch.autocast(device_type, enabled=False):
            if backend == "gathered":
                y = _gathered_swiglu(rows, weights, gate_up_proj, down_proj, plan.expert)
            elif backend == "compiled_op":
                y = grouped_swiglu(rows, weights, gate_up_proj, down_proj, plan.offsets)[0]
            elif backend == "grouped_mm":
                y = GroupedSwiGLU.apply(rows, weights, gate_up_proj, down_proj, _RaggedGroups(plan.offsets))
            else:
                padded_rows, padded_weights, slot = _pad_groups(rows, weights, plan)
                y = GroupedSwiGLU.apply(padded_rows, padded_weights, gate_up_proj, down_proj, _PaddedGroups())
                y = y.reshape(-1, y.shape[-1]).index_select(0, slot)
        return y.to(dtype)

