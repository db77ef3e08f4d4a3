"""Multi-head Latent Attention (MLA): low-rank query, a joint low-rank KV latent, and a decoupled rope key."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .norm import RMSNorm
from .rope import apply_rope


# Queries per sequence up to which a cached forward attends on the latent itself. Absorbed attention costs
# heads x (2 kv_lora_rank + rope_dim) per query-key pair and nothing up front; expanded attention costs
# heads x (qk_head_dim + v_head_dim) per pair after up-projecting every cached latent once, and runs as one fused
# kernel. Decoding (1 token, or 1 + MTP drafts) takes the first; a prefill chunk, many queries, the second (as
# DeepSeek's and vLLM's MLA do).
ABSORB_MAX_QUERIES = 8


class CacheLayer(Protocol):
    """One layer's decoding cache as attention sees it (inference/cache.py): store this step's per-token tensors by
    name, as the attention's `cache_widths()` declared them, and return every cached one."""

    def update(self, **new: torch.Tensor) -> dict[str, torch.Tensor]:
        """Store each named tensor [B, S, width]; return, by name, the cache [B, T, width] including them."""
        ...

    # True when this step's attn_mask is plain causal over its new tokens alone (a first prefill chunk).
    causal: bool
    positions: torch.Tensor  # [B, S] the new tokens' positions


class MultiHeadLatentAttention(nn.Module):
    """MLA as in DeepSeek-V2/V3.

    Keys and values are up-projected from a `kv_lora_rank` latent c_kv; position enters only through a
    `qk_rope_head_dim` key shared by all heads (k_pe) and the matching part of each query. What a decoder caches
    per token is therefore just (c_kv, k_pe).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.n_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.qk_head_dim = config.qk_head_dim
        self.v_head_dim = config.v_head_dim
        self.interleave = config.rope_interleave
        H = config.hidden_size
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(H, self.n_heads * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(H, self.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank)
            self.q_b_proj = nn.Linear(self.q_lora_rank, self.n_heads * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(H, self.kv_lora_rank + self.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, self.n_heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_head_dim, H, bias=False)
        self.softmax_scale = self.qk_head_dim ** -0.5 * config.yarn_mscale()

    def cache_widths(self) -> dict[str, int]:
        """What decoding caches per token: the latent and the rope key."""
        return {"c_kv": self.kv_lora_rank, "k_pe": self.qk_rope_head_dim}

    def query(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head query parts: q_nope [B, S, heads, qk_nope_head_dim] and rotated q_pe [B, S, heads, rope_dim]."""
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        return self.split_query(q, cos, sin)

    def split_query(self, q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The projected queries q [B, S, heads * qk_head_dim] as `query` returns them (q_pe rotated)."""
        B, S, _ = q.shape
        q_nope, q_pe = q.view(B, S, self.n_heads, self.qk_head_dim).split(
            [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        return q_nope, apply_rope(q_pe, cos, sin, self.interleave)

    def latent(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What MLA caches per token: normalized latent c_kv [B, S, kv_lora_rank] and rotated k_pe [B, S, rope_dim]."""
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        k_pe = apply_rope(k_pe.unsqueeze(2), cos, sin, self.interleave).squeeze(2)
        return self.kv_a_layernorm(c_kv), k_pe

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: torch.Tensor | None = None, cache: CacheLayer | None = None) -> torch.Tensor:
        """Causal self-attention over x [B, S, hidden] (or under `attn_mask`, True = may attend).

        With a `cache`, x holds only the new tokens: their latents are stored in it and the queries attend to every
        cached token (`attn_mask` [B, 1, S, T] then says which cached tokens each may see): through `attend_latent`
        when decoding a few tokens, through per-head keys and values when prefilling many (see ABSORB_MAX_QUERIES).
        """
        q_nope, q_pe = self.query(x, cos, sin)
        c_kv, k_pe = self.latent(x, cos, sin)
        if cache is not None:
            cached = cache.update(c_kv=c_kv, k_pe=k_pe)
            c_kv, k_pe = cached["c_kv"], cached["k_pe"]
            if x.shape[1] <= ABSORB_MAX_QUERIES:
                return self.attend_latent(q_nope, q_pe, c_kv, k_pe, attn_mask)
            if getattr(cache, "causal", False):
                attn_mask = None  # the fused causal kernel, rather than reading a [B, 1, S, S] mask
        return self.attend_expanded(q_nope, q_pe, c_kv, k_pe, attn_mask)

    def attend_expanded(self, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor,
                        attn_mask: torch.Tensor | None) -> torch.Tensor:
        """Attention on per-head keys and values up-projected from the latents c_kv [B, T, kv_lora_rank] and
        k_pe [B, T, rope_dim], by fused scaled-dot-product attention; causal (S = T) when attn_mask is None."""
        B, S, h, _ = q_nope.shape
        T = c_kv.shape[1]
        k_nope, v = self.kv_b_proj(c_kv).view(B, T, h, -1).split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # [B, heads, S, qk_head_dim]
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(-1, -1, h, -1)], dim=-1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), attn_mask=attn_mask,
                                             is_causal=attn_mask is None, scale=self.softmax_scale)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, h * self.v_head_dim))

    def attend_latent(self, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor,
                      attn_mask: torch.Tensor | None) -> torch.Tensor:
        """Attention computed on the latent itself, never on per-head keys and values ("absorb" decoding).

        q_nope [B, S, heads, qk_nope_head_dim] and q_pe [B, S, heads, rope_dim] attend to c_kv [B, T, kv_lora_rank]
        and k_pe [B, T, rope_dim]. Since k_nope = W_UK c_kv and v = W_UV c_kv per head, q_nope . k_nope equals
        (W_UK^T q_nope) . c_kv and the attention-weighted v equals W_UV (attention-weighted c_kv): W_UK is absorbed
        into the query and W_UV into the output. attn_mask [B, 1, S, T] is True where a query may attend.
        """
        B, S, h, _ = q_nope.shape
        probs = self.attention_probs(q_nope, q_pe, c_kv, k_pe, attn_mask).to(c_kv.dtype)
        w_uv = self.kv_b_proj.weight.view(h, -1, self.kv_lora_rank)[:, self.qk_nope_head_dim:]  # [h, dv, r]
        mixed = torch.matmul(probs.transpose(1, 2).reshape(B, S * h, -1), c_kv).view(B, S, h, -1)  # [B, S, h, r]
        out = torch.einsum("bshc,hdc->bshd", mixed, w_uv)  # [B, S, h, dv]
        return self.o_proj(out.reshape(B, S, h * self.v_head_dim))

    def attention_probs(self, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor,
                        attn_mask: torch.Tensor | None) -> torch.Tensor:
        """Each head's attention distribution [B, heads, S, T] (fp32) of the queries over the latents, W_UK absorbed
        into the query (see `attend_latent`); attn_mask [B, 1, S, T] is True where a query may attend."""
        B, S, h, _ = q_nope.shape
        w_uk = self.kv_b_proj.weight.view(h, -1, self.kv_lora_rank)[:, :self.qk_nope_head_dim]  # [h, dn, r]
        q_latent = torch.einsum("bshd,hdc->bshc", q_nope, w_uk)  # [B, S, h, r]
        scores = (torch.matmul(q_latent.reshape(B, S * h, -1), c_kv.transpose(1, 2))
                  + torch.matmul(q_pe.reshape(B, S * h, -1), k_pe.transpose(1, 2)))  # [B, S*h, T]
        scores = scores.view(B, S, h, -1).transpose(1, 2).float() * self.softmax_scale  # [B, h, S, T]
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        return scores.softmax(dim=-1)
