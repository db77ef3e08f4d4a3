"""Routed experts: E SwiGLU experts stored as stacked [E, ...] weights, run as grouped GEMMs on dispatched tokens.

Each expert e computes  y = down_e( w * silu(gate_e(x)) * up_e(x) )  for the token rows routed to it, w being the
row's routing weight (applied to the moe_intermediate_size-wide activation, which is narrower than hidden in
DeepSeek's shapes). The rows arrive grouped by expert (see dispatch.py), so the three projections are grouped
matrix products, run by one operator, `seekmoe::grouped_swiglu`, with a hand-written backward, in eager and compiled
code alike (inside torch.compile it is opaque: the ragged groups' sizes are data a traced graph cannot hold).
Backends:

- "grouped_mm": the operator on ragged groups, torch._grouped_mm (CPU in fp32/bf16, CUDA where this build runs it;
  the expert widths must give 16-byte row strides);
- "padded_bmm": the operator on groups padded to the largest one, torch.bmm (any build; one host synchronization
  to learn the padded size);
- "gathered": each row multiplied by its own expert's weights, gathered per row (plain autograd, made for
  inference). It reads one expert's weights per row, so it pays when there are fewer rows than experts: decoding,
  where it also has static shapes (no ragged groups, no host synchronization) and so compiles into one graph.

The backend is chosen once, by `select_backend`, when the experts are built, moved (`model.to`), switched between
train and eval mode, or configured (`configure_experts`: `parallelize` and the inference engine call it), never
per forward from global state:

    training  compiled  torch._grouped_mm runs (device, dtype, widths)  backend
    yes       either    yes                                             grouped_mm
    yes       either    no                                              padded_bmm
    no        no        yes / no                                        grouped_mm / padded_bmm, and gathered for
                                                                        a forward of fewer rows than experts
    no        yes       either                                          gathered (static shapes for decoding)

`RoutedExperts(..., backend=NAME)` (or `configure_experts(model, backend=NAME)`) overrides the table. On a CPU
without bf16 matrix instructions bf16 activations are multiplied in fp32 (`gemm_dtype`), also decided at selection.

Where the weights come from is a chain of weight providers (`WeightProvider`), each wrapping what the ones before it
give: the stacked parameters; the local shards of expert parallelism (parallel/expert_parallel.py); partly
trainable experts (train/freeze.py). LoRA adapters and quantized weights (issue 25) are one more provider each:

    class LoRAExperts(WeightProvider):                       # order 30: after freezing
        def forward(self, w):                                # w: ExpertWeights of the providers before it
            return replace(w, gate_up_proj=w.gate_up_proj + self.B @ self.A)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .dispatch import DispatchPlan

BACKENDS = ("grouped_mm", "padded_bmm", "gathered")


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


@dataclass(frozen=True)
class ExpertsBackend:
    """What `select_backend` chose: the backend of a forward with at least as many rows as experts, the one of a
    forward with fewer (decoding), and whether bf16 activations are multiplied in fp32 (`gemm_dtype`)."""

    many_rows: str
    few_rows: str
    bf16_in_fp32: bool = False


def select_backend(device: torch.device, dtype: torch.dtype, training: bool, compiled: bool, hidden: int = 16,
                   intermediate: int = 16, requested: str | None = None) -> ExpertsBackend:
    """The module docstring's table: the backend for experts of these widths computing in `dtype` on `device`;
    `requested` (one of BACKENDS) overrides it."""
    device = torch.device(device)
    bf16_in_fp32 = gemm_dtype(device, torch.bfloat16) != torch.bfloat16  # whatever autocast makes of the rows
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"unknown routed-experts backend {requested!r}: expected one of {BACKENDS}")
        return ExpertsBackend(requested, requested, bf16_in_fp32)
    compute = gemm_dtype(device, dtype)
    grouped = ("grouped_mm" if grouped_mm_supported(device.type, compute)
               and grouped_mm_fits(hidden, intermediate, compute) else "padded_bmm")
    if training:
        return ExpertsBackend(grouped, grouped, bf16_in_fp32)
    if compiled:
        return ExpertsBackend("gathered", "gathered", bf16_in_fp32)
    return ExpertsBackend(grouped, "gathered", bf16_in_fp32)


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
                   offsets: torch.Tensor, layout: str = "ragged") -> tuple[torch.Tensor, torch.Tensor]:
    """down( w * silu(gate) * up ) for rows [M, hidden] grouped by expert with group ends `offsets` [E] and their
    routing weights [M] (fp32): (y [M, hidden], the gate/up pre-activations h [M, 2I] its backward reads)."""
    if layout == "ragged":
        return _swiglu_forward(rows, weights, gate_up_proj, down_proj, _RaggedGroups(offsets))
    padded_rows, padded_weights, slot = _pad_groups(rows, weights, offsets)
    y, h = _swiglu_forward(padded_rows, padded_weights, gate_up_proj, down_proj, _PaddedGroups())
    return tuple(t.reshape(-1, t.shape[-1]).index_select(0, slot) for t in (y, h))


@grouped_swiglu.register_fake
def _(rows, weights, gate_up_proj, down_proj, offsets, layout="ragged"):
    return rows.new_empty(rows.shape[0], down_proj.shape[1]), rows.new_empty(rows.shape[0], gate_up_proj.shape[1])


@torch.library.custom_op("seekmoe::grouped_swiglu_backward", mutates_args=())
def grouped_swiglu_backward(dy: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, gate_up_proj: torch.Tensor,
                            down_proj: torch.Tensor, h: torch.Tensor, offsets: torch.Tensor, layout: str = "ragged",
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of grouped_swiglu's y for rows, weights, gate_up_proj and down_proj."""
    if layout == "ragged":
        return _swiglu_backward(dy, rows, weights, gate_up_proj, down_proj, h, _RaggedGroups(offsets))
    padded_rows, padded_weights, slot = _pad_groups(rows, weights, offsets)
    E = gate_up_proj.shape[0]

    def pad(t):  # [M, n] -> [E, capacity, n], zero rows where no row lands
        return t.new_zeros(padded_rows.shape[0] * padded_rows.shape[1], t.shape[-1]).index_copy(0, slot, t).view(
            E, -1, t.shape[-1])

    d_rows, d_weights, d_gate_up, d_down = _swiglu_backward(pad(dy), padded_rows, padded_weights, gate_up_proj,
                                                            down_proj, pad(h), _PaddedGroups())
    return (d_rows.reshape(-1, rows.shape[1]).index_select(0, slot), d_weights.reshape(-1).index_select(0, slot),
            d_gate_up, d_down)


@grouped_swiglu_backward.register_fake
def _(dy, rows, weights, gate_up_proj, down_proj, h, offsets, layout="ragged"):
    return torch.empty_like(rows), torch.empty_like(weights), torch.empty_like(gate_up_proj), torch.empty_like(down_proj)


def _setup_context(ctx, inputs, output):
    # Only the rows and the gate/up pre-activations (plus the weights it multiplies by) are kept for the backward:
    # the [M, I] activation is recomputed from h, and the routing-weight gradient comes from the down projection's
    # input gradient (sum(dy * down(a)) = sum(down^T(dy) * a)), so the expert outputs are never saved either.
    rows, weights, gate_up_proj, down_proj, offsets, layout = inputs
    ctx.layout = layout
    ctx.save_for_backward(rows, weights, gate_up_proj, down_proj, output[1], offsets)


def _backward(ctx, dy, dh):
    return *grouped_swiglu_backward(dy, *ctx.saved_tensors, ctx.layout), None, None


grouped_swiglu.register_autograd(_backward, setup_context=_setup_context)


def _gathered_swiglu(rows: torch.Tensor, weights: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                     expert: torch.Tensor) -> torch.Tensor:
    """grouped_swiglu's y with each row's expert weights gathered: rows [M, hidden], weights [M], expert [M]
    -> [M, hidden]. No ragged groups and no host synchronization, so its shapes depend on M alone."""
    h = torch.bmm(gate_up_proj.index_select(0, expert), rows.unsqueeze(-1)).squeeze(-1)  # [M, 2I]
    gate, up = h.chunk(2, dim=-1)
    a = F.silu(gate) * (up * weights.unsqueeze(-1))  # [M, I]
    return torch.bmm(down_proj.index_select(0, expert), a.to(rows.dtype).unsqueeze(-1)).squeeze(-1)


@dataclass(frozen=True)
class ExpertWeights:
    """The weights of the experts this module computes, as a provider hands them on."""

    gate_up_proj: torch.Tensor  # [E_local, 2I, hidden]
    down_proj: torch.Tensor  # [E_local, hidden, I]
    first_expert: int = 0  # global id of local expert 0 (expert parallelism holds a slice of the experts)


class WeightProvider(nn.Module):
    """One concern of where the experts' weights come from (sharding, freezing, adapters, quantization): its forward
    takes the ExpertWeights the providers before it give (the stacked parameters first) and returns what the
    experts compute with. Providers run in ascending `order`; the state dict keeps the plain [E, ...] stacks: a
    provider with tensors of its own folds them in (`fold_state`) and back out (`unfold_state`)."""

    order: int = 0

    def forward(self, weights: ExpertWeights) -> ExpertWeights:
        raise NotImplementedError

    def fold_state(self, state: dict, prefix: str, own_prefix: str) -> None:
        """Fold this provider's entries (under `own_prefix`) into the experts' stacks (under `prefix`)."""

    def unfold_state(self, state: dict, prefix: str, own_prefix: str) -> None:
        """The inverse of fold_state, for a state dict that holds the plain stacks only."""


class RoutedExperts(nn.Module):
    """E SwiGLU experts. gate_up_proj [E, 2*moe_intermediate_size, hidden] holds each expert's gate rows then its
    up rows; down_proj [E, hidden, moe_intermediate_size]. `backend` (None = the module docstring's table) picks
    the grouped GEMM; `providers` the weight providers, applied in their order."""

    def __init__(self, n_experts: int, hidden_size: int, intermediate_size: int, backend: str | None = None):
        super().__init__()
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"unknown routed-experts backend {backend!r}: expected one of {BACKENDS}")
        self.n_experts = n_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.requested_backend = backend
        self.compiled = False
        self.compute_dtype: torch.dtype | None = None  # None = the parameters' dtype
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden_size, intermediate_size))
        self.providers = nn.ModuleDict()
        self._register_state_dict_hook(_fold_providers)
        self._register_load_state_dict_pre_hook(_unfold_providers, with_module=True)
        self.select_backend()

    # ----- the backend, chosen once -----
    def select_backend(self) -> ExpertsBackend:
        """Choose the backend from the table for this module's device, dtype, mode and compile state."""
        param = self.gate_up_proj
        dtype = self.compute_dtype or param.dtype
        device = param.device if param.device.type != "meta" else torch.device("cpu")
        self.backend = select_backend(device, dtype, self.training, self.compiled, self.gate_up_proj.shape[2],
                                      self.intermediate_size, self.requested_backend)
        return self.backend

    def train(self, mode: bool = True):
        super().train(mode)
        self.select_backend()
        return self

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self.select_backend()
        return out

    # ----- the weights -----
    def add_provider(self, name: str, provider: WeightProvider) -> None:
        """Add `provider` under `name` (its state-dict prefix: `providers.NAME.`), keeping the providers in order."""
        chain = dict(self.providers.items())
        chain[name] = provider
        self.providers = nn.ModuleDict(sorted(chain.items(), key=lambda kv: kv[1].order))

    def weights(self) -> ExpertWeights:
        """The weights of the experts this module computes, through every provider."""
        w = ExpertWeights(self.gate_up_proj, self.down_proj)
        for provider in self.providers.values():
            w = provider(w)
        return w

    def expert_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up_proj, down_proj) of the experts this module computes."""
        w = self.weights()
        return w.gate_up_proj, w.down_proj

    def fold_state(self, state: dict, prefix: str = "") -> None:
        """Fold every provider's own entries of `state` into the plain stacks (the layout checkpoints keep)."""
        for name, provider in reversed(list(self.providers.items())):
            provider.fold_state(state, prefix, f"{prefix}providers.{name}.")

    def forward(self, rows: torch.Tensor, weights: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """Each dispatched row through its expert, scaled by its routing weight: rows [M, hidden] grouped by
        expert as `plan` says, weights [M] -> [M, hidden]."""
        device_type = rows.device.type
        # The activations' dtype is what autocast (a numerics setting, not a path choice) makes of them.
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else rows.dtype
        backend = self.backend
        compute = torch.float32 if backend.bf16_in_fp32 and dtype == torch.bfloat16 else dtype
        # The routing weights stay fp32 until they multiply the experts' activations (DeepSeek-V3 keeps its gating
        # in fp32); only the products enter the low-precision down projection.
        rows, weights = rows.to(compute), weights.float()
        w = self.weights()
        gate_up_proj, down_proj = w.gate_up_proj.to(compute), w.down_proj.to(compute)
        name = backend.many_rows
        if backend.few_rows != name and rows.shape[0] < gate_up_proj.shape[0]:  # a shape rule, fixed per shape
            name = backend.few_rows
        with torch.autocast(device_type, enabled=False):
            if name == "gathered":
                y = _gathered_swiglu(rows, weights, gate_up_proj, down_proj, plan.expert)
            else:
                layout = "ragged" if name == "grouped_mm" else "padded"
                y = grouped_swiglu(rows, weights, gate_up_proj, down_proj, plan.offsets, layout)[0]
        return y.to(dtype)


def _fold_providers(module: RoutedExperts, state: dict, prefix: str, local_metadata) -> None:
    """State-dict hook: a plain model's state dict holds the plain stacks. Distributed tensors (DTensors) are left
    as they are, for a sharded checkpoint to save every rank's part; `consolidated_model` folds them after
    gathering."""
    from torch.distributed.tensor import DTensor

    if module.providers and not any(isinstance(v, DTensor) for k, v in state.items() if k.startswith(prefix)):
        module.fold_state(state, prefix)


def _unfold_providers(module: RoutedExperts, state: dict, prefix: str, *args) -> None:
    for name, provider in module.providers.items():
        provider.unfold_state(state, prefix, f"{prefix}providers.{name}.")


def configure_experts(model: nn.Module, *, dtype: torch.dtype | None = None, compiled: bool | None = None,
                      backend: str | None = None) -> None:
    """Choose the backend of every RoutedExperts of `model` again: `dtype` is the dtype its experts compute in
    (autocast's, when it differs from the parameters'), `compiled` whether it runs under torch.compile, `backend`
    an override (one of BACKENDS; None keeps each module's own)."""
    for module in model.modules():
        if isinstance(module, RoutedExperts):
            if dtype is not None:
                module.compute_dtype = dtype
            if compiled is not None:
                module.compiled = compiled
            if backend is not None:
                if backend not in BACKENDS:
                    raise ValueError(f"unknown routed-experts backend {backend!r}: expected one of {BACKENDS}")
                module.requested_backend = backend
            module.select_backend()
