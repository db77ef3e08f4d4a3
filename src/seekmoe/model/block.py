"""A decoder block: pre-norm attention (MLA by default), then a pre-norm dense MLP or DeepSeekMoE layer, each residual."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .attention import CacheLayer
from .attention_choice import build_attention
from .mlp import MLP
from .moe import MoE, MoEStats
from .norm import RMSNorm


class DecoderBlock(nn.Module):
    """x + Attn(norm(x)), then + FFN(norm(.)) where FFN is a MoE (moe=True) or a dense SwiGLU MLP; the attention
    of layer `layer_idx` is the config's choice (attention_choice.py)."""

    def __init__(self, config: ModelConfig, moe: bool, layer_idx: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = build_attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoE(config) if moe else MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: torch.Tensor | None = None,
                cache: CacheLayer | None = None,
                token_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, MoEStats | None]:
        """x [B, S, hidden] -> (x, MoE stats or None); `cache` switches attention to cached latent decoding;
        token_ids [B, S] reach the MoE layer (hash routing reads them)."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, cache)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoE):
            y, stats = self.mlp(h, token_ids)
            return x + y, stats
        return x + self.mlp(h), None
