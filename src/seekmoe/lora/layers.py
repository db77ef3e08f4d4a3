"""The adapted weights: `LoRALinear` in place of a dense nn.Linear (attention projections, shared experts, dense MLP)
and `LoRAExperts`, a weight provider of the routed experts holding one adapter per expert as stacked factors.

Both compute W + scaling * B @ A with B zero at the start, so an adapted model starts exactly where its base stood.
Their state-dict entries are the base weight under its own name (`...q_a_proj.base_layer.weight`, the experts'
stacks unchanged) and the factors beside it; `fold_state` merges them into the plain Hugging Face layout
(`model.experts.fold_weight_providers`), which is how `final/`, checkpoints consolidated from several processes and
RL's rollout copy see an adapted model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..model.experts import ExpertWeights, WeightProvider
from ..model.grouped_swiglu import LowRankFactors
from .nf4 import dequantize


def _kaiming(tensor: torch.Tensor) -> torch.Tensor:
    """nn.Linear's (and PEFT's) initialization of A: uniform, bound 1/sqrt(fan_in), fan_in its last dimension."""
    bound = 1.0 / math.sqrt(tensor.shape[-1])
    return tensor.uniform_(-bound, bound)


class LoRALinear(nn.Module):
    """y = x W^T + scaling * dropout(x) A^T B^T: a frozen nn.Linear (`base_layer`) and its adapter A [rank, in],
    B [out, rank]. `weight` is the adapted W (what code reading a projection's matrix, such as MLA's absorbed
    decoding, must see)."""

    def __init__(self, base: nn.Linear, rank: int, scaling: float, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base
        base.weight.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        device = base.weight.device
        self.lora_A = nn.Parameter(_kaiming(torch.empty(rank, base.in_features, device=device)))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=device))
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    @property
    def weight(self) -> torch.Tensor:
        """W + scaling * B @ A [out, in] in the base weight's (dequantized) dtype."""
        base = dequantize(self.base_layer.weight)
        return base + (self.scaling * (self.lora_B @ self.lora_A)).to(base.dtype)

    @property
    def bias(self) -> torch.Tensor | None:
        """The base projection's bias (not adapted), or None."""
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out]; the adapter runs on the rank-wide path (never forming B @ A)."""
        y = F.linear(x, dequantize(self.base_layer.weight), self.base_layer.bias)
        return y + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    def fold_state(self, state: dict, prefix: str) -> None:
        """Replace this module's entries of a full state dict by the merged `prefix + 'weight'` (and the base's
        `prefix + 'bias'`)."""
        a, b = state.pop(prefix + "lora_A", None), state.pop(prefix + "lora_B", None)
        base = state.pop(prefix + "base_layer.weight", None)
        bias = state.pop(prefix + "base_layer.bias", None)
        if base is None or a is None or b is None:
            return
        base = dequantize(base)
        state[prefix + "weight"] = (base.float() + self.scaling * (b.float() @ a.float())).to(base.dtype)
        if bias is not None:
            state[prefix + "bias"] = bias

    def extra_repr(self) -> str:
        return f"rank={self.lora_A.shape[0]}, scaling={self.scaling}"


class LoRAExperts(WeightProvider):
    """One LoRA adapter per routed expert, on both of its stacked weights: gate_up_A [E, r, hidden],
    gate_up_B [E, 2I, r], down_A [E, r, I], down_B [E, hidden, r]. The forward hands on the base weights and the
    factors of the experts it is given (`ExpertWeights.low_rank`): the experts' operator adds
    scaling * B_e(A_e(input)) to each projection through the same grouped GEMMs, per routed row, and never forms
    W_e + scaling * B_e @ A_e (which would copy every expert's weights at every step, routed or not).
    `materialize=True` hands on the merged weights instead (the reference the tests and the benchmark compare with).

    The factors are every expert's, on every rank (as train/freeze.py's TrainableRows): under expert parallelism
    this provider comes after the shards (order 30 > 10) and adapts the local slice of experts, and the ranks without
    an expert add zeros to its gradient (fsdp.py averages a provider's gradients over every rank)."""

    order = 30

    def __init__(self, n_experts: int, hidden: int, intermediate: int, rank: int, scaling: float,
                 device: torch.device | None = None, materialize: bool = False):
        super().__init__()
        self.scaling = scaling
        self.materialize = materialize
        E, H, I = n_experts, hidden, intermediate
        self.gate_up_A = nn.Parameter(_kaiming(torch.empty(E, rank, H, device=device)))
        self.gate_up_B = nn.Parameter(torch.zeros(E, 2 * I, rank, device=device))
        self.down_A = nn.Parameter(_kaiming(torch.empty(E, rank, I, device=device)))
        self.down_B = nn.Parameter(torch.zeros(E, H, rank, device=device))

    def factors(self, first: int = 0, n: int | None = None) -> LowRankFactors:
        """The factors of experts first .. first + n - 1 (all by default)."""
        every = LowRankFactors(self.gate_up_A, self.gate_up_B, self.down_A, self.down_B, self.scaling)
        return every.select(first, self.gate_up_A.shape[0] if n is None else n)

    def delta(self, name: str, first: int = 0, n: int | None = None) -> torch.Tensor:
        """scaling * B_e @ A_e [n, out, in] of experts first .. first + n - 1 for `name` ('gate_up_proj' or
        'down_proj')."""
        return self.factors(first, n).delta(name)

    def forward(self, weights: ExpertWeights) -> ExpertWeights:
        """The (dequantized) base weights of the local experts with their factors beside them; the merged weights
        where `materialize`. Another low-rank delta handed in is merged into the base first."""
        weights = weights.merged()
        first, n = weights.first_expert, weights.gate_up_proj.shape[0]
        factors = self.factors(first, n)
        if not self.materialize:
            # Copies (rank-sized): under FSDP this provider is a unit of its own whose gathered parameters are freed
            # once its forward returns, before the experts' operator reads (and saves) the factors; the copies'
            # gradients reach the parameters after FSDP's pre-backward hook has gathered them again.
            factors = LowRankFactors(*(t.clone() for t in factors.tensors()), factors.scaling)
        base = ExpertWeights(dequantize(weights.gate_up_proj), dequantize(weights.down_proj), first_expert=first,
                             low_rank=factors)
        return base.merged() if self.materialize else base

    def fold_state(self, state: dict, prefix: str, own_prefix: str) -> None:
        factors = {k: state.pop(own_prefix + k, None) for k in ("gate_up_A", "gate_up_B", "down_A", "down_B")}
        if any(f is None for f in factors.values()):
            return
        for name, (a, b) in (("gate_up_proj", ("gate_up_A", "gate_up_B")), ("down_proj", ("down_A", "down_B"))):
            base = dequantize(state[prefix + name])
            delta = torch.bmm(factors[b].float(), factors[a].float()) * self.scaling
            state[prefix + name] = (base.float() + delta.to(base.device)).to(base.dtype)
