"""Standard multi-head attention with RoPE: DeepSeekMoE 16B's and DeepSeek-VL2-Tiny's / DeepSeek-OCR's language
models (`use_mla: false`), the attention MLA replaced. Built by `attention_choice.build_attention`; numerics match
transformers' `DeepseekOcr2TextAttention` (q/k/v/o projections, biases when `attention_bias`, RoPE over the whole
head, half-split pairs unless `rope_interleave`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .rope import apply_rope


class MultiHeadAttention(nn.Module):
    """Causal self-attention with `num_attention_heads` query, key and value heads of hidden_size / heads each.

    What a decoder caches per token is every head's rotated key and value: 2 x hidden_size values per layer, against
    MLA's kv_lora_rank + qk_rope_head_dim (`cache_widths`).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = config.num_attention_heads, config.mha_head_dim
        self.interleave = config.rope_interleave
        H, width, bias = config.hidden_size, config.num_attention_heads * config.mha_head_dim, config.attention_bias
        self.q_proj = nn.Linear(H, width, bias=bias)
        self.k_proj = nn.Linear(H, width, bias=bias)
        self.v_proj = nn.Linear(H, width, bias=bias)
        self.o_proj = nn.Linear(width, H, bias=bias)
        self.softmax_scale = self.head_dim ** -0.5

    def cache_widths(self) -> dict[str, int]:
        """Per-token values this attention keeps in a decoding cache: every head's key and value."""
        width = self.n_heads * self.head_dim
        return {"k": width, "v": width}

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        """Causal self-attention over x [B, S, hidden] (or under `attn_mask` [B, 1, S, T], True = may attend).

        With a `cache` (a decoding cache's layer), x holds only the new tokens: their keys and values [B, S, width]
        are stored in it and the queries attend to every cached token of their slot."""
        B, S, _ = x.shape
        shape = (B, S, self.n_heads, self.head_dim)
        q = apply_rope(self.q_proj(x).view(shape), cos, sin, self.interleave)
        k = apply_rope(self.k_proj(x).view(shape), cos, sin, self.interleave)
        v = self.v_proj(x)
        if cache is not None:
            cached = cache.update(k=k.reshape(B, S, -1), v=v)
            k, v = cached["k"], cached["v"]
            if getattr(cache, "causal", False):
                attn_mask = None  # the fused causal kernel, rather than reading a [B, 1, S, S] mask
        T = k.shape[1]
        k = k.reshape(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, heads, T, head_dim]
        v = v.reshape(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.to(q.dtype), v.to(q.dtype), attn_mask=attn_mask,
                                             is_causal=attn_mask is None, scale=self.softmax_scale)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1))
