"""Rotary position embedding for MLA's decoupled rope dimensions, with YaRN context extension."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ModelConfig, yarn_get_mscale


def rope_inv_freq(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [rope_head_dim / 2] and the cos/sin scale (YaRN's mscale ratio, else 1)."""
    dim, base = config.rope_head_dim, config.rope_theta  # MLA's rope part, or a multi-head attention's whole head
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    rs = config.rope_scaling
    if not rs:
        return inv_freq, 1.0
    factor = rs["factor"]
    original = rs["original_max_position_embeddings"]
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        # The dimension whose wavelength makes `num_rotations` turns over the original context.
        return dim * math.log(original / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    # High-frequency dims (ramp 0) keep their frequency; low-frequency dims (ramp 1) are interpolated by `factor`.
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        attention_factor = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
    else:
        attention_factor = yarn_get_mscale(factor)
    return inv_freq, attention_factor


class RotaryEmbedding(nn.Module):
    """Maps positions to the (cos, sin) of each rotated pair, [..., seq, 1, qk_rope_head_dim / 2], in fp32."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        inv_freq, self.attention_factor = rope_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Recompute the frequencies in place (after `to_empty`, which leaves buffers uninitialized)."""
        self.inv_freq.copy_(rope_inv_freq(self.config)[0])

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.float()[..., None] * self.inv_freq.float()  # [..., seq, dim/2]
        cos = (angles.cos() * self.attention_factor).unsqueeze(-2)
        sin = (angles.sin() * self.attention_factor).unsqueeze(-2)
        return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool = True) -> torch.Tensor:
    """Rotate x [batch, seq, heads, rope_dim] by position; pairs are (2i, 2i+1) when interleaved, else (i, i+d/2)."""
    dtype = x.dtype
    x = x.float()
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2).to(dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(dtype)
