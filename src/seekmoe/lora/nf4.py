"""QLoRA's base weights: 4-bit NormalFloat (NF4, Dettmers et al. 2023) through torchao, dequantized on use.

torchao is an optional dependency (`pip install seekmoe[quant]`); `require_torchao` turns its absence into one clear
line before a run writes anything.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model.experts import ExpertWeights, WeightProvider

EXPERT_STACKS = ("gate_up_proj", "down_proj")
NF4_BLOCK = 64  # values sharing one scale (QLoRA's choice)
NF4_SCALER_BLOCK = 256  # scales sharing one second-level scale (double quantization)


def require_torchao():
    """The torchao module, or ValueError saying how to install it."""
    try:
        import torchao.quantization as quantization
    except ImportError as e:
        raise ValueError(f"--quantize nf4 needs torchao (not importable here: {e}): pip install 'torchao>=0.12' "
                         f"(or pip install 'seekmoe[quant]')") from None
    return quantization


def is_nf4(tensor) -> bool:
    """Whether `tensor` is a torchao NF4Tensor (False without torchao installed)."""
    cls = type(tensor)
    return cls.__name__ == "NF4Tensor" and cls.__module__.startswith("torchao")


def dequantize(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` itself, or its dequantized values when it is NF4 (in the dtype it was quantized from)."""
    return tensor.get_original_weight() if is_nf4(tensor) else tensor


def to_nf4(weight: torch.Tensor) -> torch.Tensor:
    """`weight` [out, in] quantized to NF4: blocks of NF4_BLOCK values sharing a scale, the scales quantized again
    in blocks of up to NF4_SCALER_BLOCK (the largest power of two dividing their count: a small matrix has few).
    ValueError when the count of its values is not a multiple of NF4_BLOCK."""
    import math

    quantization = require_torchao()
    if weight.numel() % NF4_BLOCK:
        raise ValueError(f"--quantize nf4: a weight of shape {tuple(weight.shape)} has {weight.numel()} values, not "
                         f"a multiple of NF4's block of {NF4_BLOCK}")
    scaler_block = math.gcd(weight.numel() // NF4_BLOCK, NF4_SCALER_BLOCK)
    return quantization.to_nf4(weight.detach().contiguous(), NF4_BLOCK, scaler_block)


class NF4Experts(WeightProvider):
    """The routed experts' frozen stacks kept in NF4 (QLoRA): gate_up_proj as [E * 2I, hidden] and down_proj as
    [E * hidden, I] NF4 matrices (torchao's NF4 is two-dimensional), dequantized to [E, ...] in the forward. The
    experts' own stacks shrink to empty [0, ...] placeholders that keep their widths and dtype. First in the chain
    (order 5): the providers after it (the adapters) see plain weights."""

    order = 5

    def __init__(self, experts):
        super().__init__()
        self.shapes = {}
        for name in EXPERT_STACKS:
            full = getattr(experts, name)
            self.shapes[name] = tuple(full.shape)
            self.register_parameter(name, nn.Parameter(to_nf4(full.data.reshape(-1, full.shape[-1])),
                                                       requires_grad=False))
            setattr(experts, name, nn.Parameter(full.data.new_empty(0, *full.shape[1:]), requires_grad=False))

    def forward(self, weights: ExpertWeights) -> ExpertWeights:
        """The dequantized stacks (the incoming ones are the placeholders)."""
        stacks = [getattr(self, n).get_original_weight().view(self.shapes[n]) for n in EXPERT_STACKS]
        return ExpertWeights(*stacks, first_expert=weights.first_expert)

    def fold_state(self, state: dict, prefix: str, own_prefix: str) -> None:
        for name in EXPERT_STACKS:
            quantized = state.pop(own_prefix + name, None)
            if quantized is not None:
                state[prefix + name] = dequantize(quantized).reshape(self.shapes[name])
