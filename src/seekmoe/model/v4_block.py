"""A DeepSeek-V4 decoder block: V4 attention and a DeepSeekMoE layer (hash-routed or learned), each entered through
a manifold-constrained hyper-connection over the `hc_mult` residual streams (hyper_connections.py).

block_choice.py builds these instead of `DecoderBlock` when `config.is_v4`; the blocks take and return the streams
[B, S, hc_mult, hidden] (the model expands the embeddings onto them and collapses them with `HyperHead`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .attention_choice import build_attention
from .hyper_connections import HyperConnection
from .moe import MoE, MoEStats
from .norm import RMSNorm
from .v4_rope import V4RotaryEmbedding


class V4DecoderBlock(nn.Module):
    """streams -> streams: attention on the pre-collapsed, normed streams merged back by attn_hc, then the MoE the
    same way by ffn_hc (names as transformers' DeepseekV4DecoderLayer)."""

    def __init__(self, config: ModelConfig, layer_idx: int, rotary: V4RotaryEmbedding):
        super().__init__()
        H, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = build_attention(config, layer_idx, rotary)
        self.mlp = MoE(config, layer_idx)
        self.input_layernorm = RMSNorm(H, eps)
        self.post_attention_layernorm = RMSNorm(H, eps)
        hc = (H, config.hc_mult, config.hc_sinkhorn_iters, config.hc_eps, eps)
        self.attn_hc = HyperConnection(*hc)
        self.ffn_hc = HyperConnection(*hc)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: torch.Tensor | None = None, cache=None,
                token_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, MoEStats]:
        """x [B, S, hc_mult, hidden] -> (streams, MoE stats); cos/sin from V4RotaryEmbedding; token_ids [B, S]
        reach the MoE (hash layers route by them)."""
        post, comb, collapsed = self.attn_hc(x)
        out = self.self_attn(self.input_layernorm(collapsed), cos, sin, attn_mask, cache)
        x = HyperConnection.merge(x, out, post, comb)
        post, comb, collapsed = self.ffn_hc(x)
        y, stats = self.mlp(self.post_attention_layernorm(collapsed), token_ids)
        return HyperConnection.merge(x, y, post, comb), stats
