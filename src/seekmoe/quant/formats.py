"""Weight-only integer formats: what an int8 or int4 weight holds, and how it is made from a float one and back.

A weight [..., out, in] (a linear's [out, in], or a stack of experts' [E, out, in]) is stored as
- int8: `qweight` int8 [..., out, in] and one fp32 `scale` per output channel [..., out]: w = q * scale, symmetric,
  the scale being the row's largest magnitude / 127;
- int4: `qweight` uint8 [..., out, in / 2], two 4-bit codes a byte, and one fp16 `scale` per group of `group_size`
  consecutive inputs [..., out, in / group_size]: w = (q - 8) * scale, the scale chosen as in llama.cpp's Q4_0 so
  that the group's largest-magnitude value is exactly -8 * scale (all 16 codes in use). 32-wide groups with fp16
  scales cost 4.5 bits a weight. Within a group's group_size / 2 bytes, byte j holds column j in its low nibble
  and column j + group_size / 2 in its high one (llama.cpp's Q4_0 order): unpacking is a mask and a shift whose
  results meet contiguous halves of the inputs, where the older order (`INT4_ORDERS`: "interleaved", even column
  low, odd high; folders written before "halves") needs a strided gather of the inputs per byte, which kept the
  fused product compute-bound (benchmarks/README.md).

Everything here is plain tensor arithmetic (no torch-version-specific packing), so the stored bytes mean the same
on every machine; kernels.py computes with them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCHEMES = ("int8", "int4")
INT4_ORDERS = ("halves", "interleaved")  # the nibble order of today's int4 codes, then that of older folders
_LOW_NIBBLES = 0x0F0F0F0F0F0F0F0F  # the low nibble of each byte of a 64-bit word
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
    q = torch.round(groups / scale.float().unsqueeze(-1)).add_(8).clamp_(0, 15).to(torch.uint8)  # [..., out, G, g]
    low, high = q.chunk(2, dim=-1)
    return (low | (high << 4)).flatten(-2), scale


def unpack_int4(qweight: torch.Tensor, groups: int) -> torch.Tensor:
    """The 4-bit codes (0..15) of packed qweight [..., out, in / 2] (`groups` groups a row) as uint8 [..., out, in]."""
    packed = qweight.unflatten(-1, (groups, -1))  # [..., out, G, g/2]
    return torch.cat([packed & 15, packed >> 4], dim=-1).flatten(-2)


def int4_from_interleaved(qweight: torch.Tensor, groups: int) -> torch.Tensor:
    """qweight packed in the older "interleaved" order (even column in the low nibble, odd in the high) repacked in
    today's "halves" order, for int4 folders written before it."""
    codes = torch.stack([qweight & 15, qweight >> 4], dim=-1).flatten(-2).unflatten(-1, (groups, 2, -1))
    return (codes[..., 0, :] | (codes[..., 1, :] << 4)).flatten(-2)


def dequantize(qweight: torch.Tensor, scale: torch.Tensor, scheme: str, dtype: torch.dtype = torch.float32,
               ) -> torch.Tensor:
    """The float weight [..., out, in] in `dtype` that (qweight, scale) stand for."""
    if scheme == "int8":
        return (qweight.to(torch.float32) * scale.float().unsqueeze(-1)).to(dtype)
    G = scale.shape[-1]
    if (qweight.shape[-1] // G) % 8 == 0 and qweight.is_contiguous() and qweight.storage_offset() % 8 == 0:
        # Mask and shift 8 bytes a 64-bit word (8x fewer elements than bytes: 2.1x faster at the 289M experts'
        # shapes), then one conversion: what eager int4 decoding spends its time on.
        words = qweight.view(torch.int64).unflatten(-1, (G, -1))  # [..., out, G, g/16]
        codes = torch.stack([words & _LOW_NIBBLES, (words >> 4) & _LOW_NIBBLES], dim=-2).view(torch.int8).sub_(8)
        groups = codes.view(*scale.shape, -1).float()  # [..., out, G, g]
    else:
        groups = unpack_int4(qweight, G).to(torch.float32).sub_(8).unflatten(-1, (G, -1))
    return groups.mul_(scale.float().unsqueeze(-1)).flatten(-2).to(dtype)


def bytes_per_weight(spec: QuantSpec) -> float:
    """Bytes one weight costs, scales included (for an input width large against the group size)."""
    return 1.0 if spec.scheme == "int8" else 0.5 + 2 / spec.group_size
