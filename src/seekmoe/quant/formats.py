"""Weight-only integer formats: what an int8 or int4 weight holds, and how it is made from a float one and back.

A weight [..., out, in] (a linear's [out, in], or a stack of experts' [E, out, in]) is stored as
- int8: `qweight` int8 [..., out, in] and one fp32 `scale` per output channel [..., out]: w = q * scale, symmetric,
  the scale being the row's largest magnitude / 127;
- int4: `qweight` uint8 [..., out, in / 2], two 4-bit codes a byte (the low nibble holds the even column), and one
  fp16 `scale` per group of `group_size` consecutive inputs [..., out, in / group_size]: w = (q - 8) * scale, the
  scale chosen as in llama.cpp's Q4_0 so that the group's largest-magnitude value is exactly -8 * scale (all 16
  codes in use). 32-wide groups with fp16 scales cost 4.5 bits a weight.

Everything here is plain tensor arithmetic (no torch-version-specific packing), so the stored bytes mean the same
on every machine; kernels.py computes with them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCHEMES = ("int8", "int4")
DEFAULT_GROUP_SIZE = 32  # llama.cpp's Q4_0/Q4_K sub-blocks: finer groups, more exact, 0.5 bit a weight of scales


@dataclass(frozen=True)
class QuantSpec:
    """A scheme ("int8" or "int4") and, for int4, its group size (inputs sharing one scale)."""

    scheme: str
    group_size: int = DEFAULT_GROUP_SIZE

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"quantization scheme {self.scheme!r} is unknown: expected one of {SCHEMES}")
        if self.scheme == "int4" and (self.group_size < 2 or self.group_size % 2):
            raise ValueError(f"group_size={self.group_size}: expected an even number of at least 2 for int4")

    def check_width(self, in_features: int, what: str) -> None:
        """ValueError naming `what` unless its input width splits into whole groups."""
        if self.scheme == "int4" and in_features % self.group_size:
            raise ValueError(f"int4 needs every input width to be a multiple of group_size={self.group_size}, but "
                             f"{what} has {in_features} inputs: pick a group size that divides it (--group-size)")

    def to_json(self) -> dict:
        return {"scheme": self.scheme, **({"group_size": self.group_size} if self.scheme == "int4" else {})}


def quantize(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(qweight, scale) of the float weight w [..., out, in], as the module docstring lays them out."""
    w = w.detach().float()
    if spec.scheme == "int8":
        scale = w.abs().amax(dim=-1) / 127  # [..., out]
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: any scale, codes 0
        q = torch.round(w / scale.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
        return q, scale
    spec.check_width(w.shape[-1], f"a weight of shape {tuple(w.shape)}")
    groups = w.unflatten(-1, (-1, spec.group_size))  # [..., out, G, g]
    extreme = groups.gather(-1, groups.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)  # signed, [..., out, G]
    scale = (extreme / -8).half()  # fp16 storage, so the codes are chosen against the scale actually kept
    scale = torch.where(scale != 0, scale, torch.ones_like(scale))
    q = torch.round(groups / scale.float().unsqueeze(-1)).add_(8).clamp_(0, 15).to(torch.uint8).flatten(-2)
    return q[..., 0::2] | (q[..., 1::2] << 4), scale


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """The 4-bit codes (0..15) of packed qweight [..., out, in / 2] as uint8 [..., out, in]."""
    return torch.stack([qweight & 15, qweight >> 4], dim=-1).flatten(-2)


def dequantize(qweight: torch.Tensor, scale: torch.Tensor, scheme: str, dtype: torch.dtype = torch.float32,
               ) -> torch.Tensor:
    """The float weight [..., out, in] in `dtype` that (qweight, scale) stand for."""
    if scheme == "int8":
        return (qweight.to(torch.float32) * scale.float().unsqueeze(-1)).to(dtype)
    codes = unpack_int4(qweight).to(torch.float32) - 8
    groups = codes.unflatten(-1, (scale.shape[-1], -1))  # [..., out, G, g]
    return (groups * scale.float().unsqueeze(-1)).flatten(-2).to(dtype)


def bytes_per_weight(spec: QuantSpec) -> float:
    """Bytes one weight costs, scales included (for an input width large against the group size)."""
    return 1.0 if spec.scheme == "int8" else 0.5 + 2 / spec.group_size
