"""QLoRA's base weights: 4-bit NormalFloat (NF4, Dettmers et al. 2023) through torchao, dequantized on use.

torchao is an optional dependency (`pip install seekmoe[quant]`); `require_torchao` turns its absence into one clear
line before a run writes anything.
"""

from __future__ import annotations

import torch

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
    """`weight` [out, in] quantized to NF4 (blocks of NF4_BLOCK along rows of `in`); ValueError when the count of its
    values is not a multiple of the block sizes."""
    quantization = require_torchao()
    if weight.numel() % (NF4_BLOCK * NF4_SCALER_BLOCK):
        raise ValueError(f"--quantize nf4: a weight of shape {tuple(weight.shape)} has {weight.numel()} values, not "
                         f"a multiple of {NF4_BLOCK * NF4_SCALER_BLOCK} (NF4's blocks of {NF4_BLOCK} values, "
                         f"{NF4_SCALER_BLOCK} scales a block of scales)")
    return quantization.to_nf4(weight.detach(), NF4_BLOCK, NF4_SCALER_BLOCK)
