"""Routed experts: E SwiGLU experts stored as stacked [E, ...] weights, run as grouped GEMMs on dispatched tokens.

Each expert e computes  y = down_e( w * silu(gate_e(x)) * up_e(x) )  for the token rows routed to it, w being the
row's routing weight (applied to the moe_intermediate_size-wide activation, which is narrower than hidden in
DeepSeek's shapes). The rows arrive grouped by expert (see dispatch.py), so the three projections are grouped
matrix products, run by one operator, `seekmoe::grouped_swiglu` (grouped_swiglu.py), with a hand-written backward,
in eager and compiled code alike. Backends:

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
trainable experts (train/freeze.py). LoRA adapters and quantized weights (issue 25) are one more provider each.
A provider may hand on low-rank deltas beside the weights (`ExpertWeights.low_rank`) instead of adding them in: the
operator runs them on the rank-wide path, so an adapted step costs the routed rows times the rank, not a new copy of
every expert's weights:

    class LoRAExperts(WeightProvider):                       # order 30: after the shards and freezing
        def forward(self, w):                                # w: ExpertWeights of the providers before it
            return replace(w, low_rank=LowRankFactors(self.gate_up_A, self.gate_up_B, self.down_A, self.down_B, s))
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from .dispatch import DispatchPlan
from .grouped_swiglu import LowRankFactors, gathered_swiglu, grouped_mm_supported, grouped_swiglu

BACKENDS = ("grouped_mm", "padded_bmm", "gathered")


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


@dataclass(frozen=True)
class ExpertWeights:
    """The weights of the experts this module computes, as a provider hands them on."""

    gate_up_proj: torch.Tensor  # [E_local, 2I, hidden]
    down_proj: torch.Tensor  # [E_local, hidden, I]
    first_expert: int = 0  # global id of local expert 0 (expert parallelism holds a slice of the experts)
    # Deltas the operator adds on the rank-wide path, for the same local experts. A provider that builds new weights
    # carries it over (dataclasses.replace) or merges it first (`merged`).
    low_rank: LowRankFactors | None = None

    def merged(self) -> "ExpertWeights":
        """The same weights with `low_rank` added into the stacks (W + scaling * B @ A, differentiable)."""
        if self.low_rank is None:
            return self
        stacks = [w + self.low_rank.delta(n).to(w.dtype) for n, w in (("gate_up_proj", self.gate_up_proj),
                                                                      ("down_proj", self.down_proj))]
        return ExpertWeights(*stacks, first_expert=self.first_expert)


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

    def __init__(self, n_experts: int, hidden_size: int, intermediate_size: int, backend: str | None = None,
                 swiglu_limit: float | None = None):
        super().__init__()
        self.swiglu_limit = swiglu_limit  # DeepSeek-V4 clamps gate and up (grouped_swiglu.clamp_gate_up)
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
        # The state dict holds what the module holds (the stacks and each provider's own tensors), the same keys and
        # shapes in one process and sharded, so a checkpoint resumes under another layout; the Hugging Face layout
        # folds them into the stacks (`fold_weight_providers`). A state dict of plain stacks loads too.
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
        """(gate_up_proj, down_proj) of the experts this module computes (low-rank deltas merged in)."""
        w = self.weights().merged()
        return w.gate_up_proj, w.down_proj

    def fold_state(self, state: dict, prefix: str = "") -> None:
        """Fold every provider's own entries of `state` into the plain stacks (the layout checkpoints keep), in the
        providers' order, as the forward applies them (quantized stacks become plain before adapters add to them)."""
        for name, provider in self.providers.items():
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
        name = backend.many_rows
        if backend.few_rows != name and rows.shape[0] < w.gate_up_proj.shape[0]:  # a shape rule, fixed per shape
            name = backend.few_rows
        with torch.autocast(device_type, enabled=False):
            if name == "gathered":
                # Converts only the gathered experts' weights: converting whole stacks would read (and, mapped from
                # a file, page in) every expert at every decoding step.
                lr = () if w.low_rank is None else (w.low_rank,)
                y = gathered_swiglu(rows, weights, w.gate_up_proj, w.down_proj, plan.expert, self.swiglu_limit, *lr)
            else:
                layout = "ragged" if name == "grouped_mm" else "padded"
                lr = () if w.low_rank is None else (*w.low_rank.to(compute).tensors(), w.low_rank.scaling)
                y = grouped_swiglu(rows, weights, w.gate_up_proj.to(compute), w.down_proj.to(compute), plan.offsets,
                                   layout, self.swiglu_limit, *lr)[0]
        return y.to(dtype)


def _unfold_providers(module: RoutedExperts, state: dict, prefix: str, *args) -> None:
    for name, provider in module.providers.items():
        provider.unfold_state(state, prefix, f"{prefix}providers.{name}.")


def fold_weight_providers(model: nn.Module, state: dict) -> dict:
    """Fold the weight providers' own entries of `model`'s full (unsharded) state dict into the plain [E, ...]
    stacks, in place: what the Hugging Face layout saves. Returns `state`.

    A dense module put in place of an nn.Linear from outside (lora/layers.py's LoRALinear) that keeps its weight in
    another form folds it the same way: its `fold_state(state, prefix)` leaves the plain `prefix + 'weight'`."""
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, RoutedExperts):
            if module.providers:
                module.fold_state(state, prefix)
        elif not isinstance(module, WeightProvider) and callable(getattr(module, "fold_state", None)):
            module.fold_state(state, prefix)
    return state


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
