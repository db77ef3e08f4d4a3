"""Multi-Token Prediction (DeepSeek-V3): D sequential modules that each predict one token further ahead."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .attention import CacheLayer
from .block import DecoderBlock
from .moe import MoEStats
from .norm import RMSNorm


class MTPModule(DecoderBlock):
    """Depth-k prediction: h^k_i = Block(eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)])).

    It shares the embedding and output head with the main model; its own `shared_head.norm` normalizes h^k before
    that head. Parameter names follow DeepSeek-V3's checkpoint (`model.layers.61.enorm.weight`, ...).
    """

    def __init__(self, config: ModelConfig, depth: int = 1):
        super().__init__(config, moe=config.n_routed_experts > 0, layer_idx=config.num_hidden_layers + depth - 1)
        H = config.hidden_size
        self.enorm = RMSNorm(H, config.rms_norm_eps)
        self.hnorm = RMSNorm(H, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * H, H, bias=False)
        self.shared_head = nn.ModuleDict({"norm": RMSNorm(H, config.rms_norm_eps)})

    def forward(self, h_prev: torch.Tensor, next_embeds: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: torch.Tensor | None = None,
                cache: CacheLayer | None = None,
                token_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, MoEStats | None]:
        """h_prev [B, S, H] from the previous depth, next_embeds [B, S, H] the embeddings of the tokens k ahead
        (token_ids [B, S], for hash routing); `attn_mask` and `cache` as in `DecoderBlock` (for drafting tokens
        while decoding)."""
        h = self.eh_proj(torch.cat([self.enorm(next_embeds), self.hnorm(h_prev)], dim=-1))
        return super().forward(h, cos, sin, attn_mask, cache, token_ids)
