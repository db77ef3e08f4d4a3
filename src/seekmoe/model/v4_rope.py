"""DeepSeek-V4's two rotary embeddings: "main" (base rope_theta, plain) for sliding-window layers and "compress"
(base compress_rope_theta, with rope_scaling's YaRN) for the compressed layers, their compressors and the indexer.
Both rotate interleaved pairs of the *last* qk_rope_head_dim channels of a head."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .rope import apply_rope, rope_inv_freq


def v4_inv_freqs(config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(main, compress) inverse frequencies [qk_rope_head_dim / 2]. The compressed branches' YaRN keeps cos/sin
    unscaled (the V4 reference does not apply YaRN's mscale; transformers pins attention_factor to 1)."""
    main = rope_inv_freq(config.replace(rope_scaling=None))[0]
    compress = rope_inv_freq(config.replace(rope_theta=config.compress_rope_theta))[0]
    return main, compress


class V4RotaryEmbedding(nn.Module):
    """positions [..., S] -> (cos, sin), each [2, ..., S, 1, qk_rope_head_dim / 2] fp32: index 0 the main rope,
    index 1 the compressed branches' (one tensor, so the model's loop and MTP slicing treat it like MLA's)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        main, compress = v4_inv_freqs(config)
        self.register_buffer("inv_freq", torch.stack([main, compress]), persistent=False)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Recompute the frequencies in place (after `to_empty`)."""
        self.inv_freq.copy_(torch.stack(v4_inv_freqs(self.config)))

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.float()[None, ..., None] * self.inv_freq.float().view(2, *([1] * positions.dim()), -1)
        return angles.cos().unsqueeze(-2), angles.sin().unsqueeze(-2)

    @staticmethod
    def angles_at(inv_freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [..., S, 1, d/2] of one rope's inv_freq at `positions` [..., S] (compressed keys' positions)."""
        angles = positions.float()[..., None] * inv_freq.float()
        return angles.cos().unsqueeze(-2), angles.sin().unsqueeze(-2)


def rope_tail(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, S, heads, D] with its last 2 * cos.shape[-1] channels rotated (interleaved pairs), the rest as is."""
    rd = 2 * cos.shape[-1]
    return torch.cat([x[..., :-rd], apply_rope(x[..., -rd:], cos, sin, interleave=True)], dim=-1)
