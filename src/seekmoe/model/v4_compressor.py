"""DeepSeek-V4's KV compressors and the lightning indexer (paper section 2.3).

A compressor turns every `rate` consecutive tokens into one key (which is also the value: V4 shares one KV head):
a softmax-gated sum of per-token projections, a learned bias per position in the window, RMS-normalized, its rope
tail rotated at the window's first position. Heavily compressed attention (HCA) uses disjoint windows; compressed
sparse attention (CSA) overlaps them: each token projects two series, and window w's key mixes window w-1's first
series with window w's second (width 2 * rate, stride rate). CSA's indexer compresses the same windows at its own
width and scores them per query, ReLU(q . k) weighted per head; each query keeps the top `index_topk` windows.

Names are transformers' (`self_attn.compressor.indexer.scorer.weights_proj`, ...), so the state dict is its.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .norm import RMSNorm
from .v4_rope import rope_tail


class Compressor(nn.Module):
    """One key [head_dim] per `rate` tokens: softmax(gate + position_bias)-weighted sum of the kv projections over
    the window (and over the previous window's first series when `overlap`), normalized, rope tail rotated."""

    def __init__(self, hidden_size: int, head_dim: int, rate: int, overlap: bool, eps: float):
        super().__init__()
        self.head_dim, self.rate, self.overlap = head_dim, rate, overlap
        width = 2 * head_dim if overlap else head_dim
        self.kv_proj = nn.Linear(hidden_size, width, bias=False)
        self.gate_proj = nn.Linear(hidden_size, width, bias=False)
        self.position_bias = nn.Parameter(torch.empty(rate, width))
        self.kv_norm = RMSNorm(head_dim, eps)

    @torch.no_grad()
    def reset_parameters(self, std: float) -> None:
        """A zero position bias (its linears and norm are initialized as every other one)."""
        self.position_bias.zero_()

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token (kv, gate) [B, S, width] of x [B, S, hidden]: what a decoding cache buffers until a window closes."""
        return self.kv_proj(x), self.gate_proj(x)

    def pool(self, kv: torch.Tensor, gate: torch.Tensor, first_position: int | torch.Tensor, rope_inv_freq: torch.Tensor,
             prior: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Keys [B, n, head_dim] of the n complete windows of kv, gate [B, n * rate, width], the first starting at
        `first_position`; `prior` (kv, gate) [B, rate, head_dim] is the previous window's first series (overlap)."""
        B, m, D = kv.shape[0], self.rate, self.head_dim
        n = kv.shape[1] // m
        if n == 0:  # no window complete yet
            return kv.new_zeros(B, 0, D)
        kv = kv.view(B, n, m, -1)
        gate = gate.view(B, n, m, -1) + self.position_bias
        if self.overlap:
            if prior is None:  # before the first window: no keys (weight 0 after the softmax)
                prior = (kv.new_zeros(B, 1, m, D), gate.new_full((B, 1, m, D), float("-inf")))
            else:
                prior = (prior[0].unsqueeze(1).to(kv.dtype), prior[1].unsqueeze(1).to(gate.dtype))
            kv = torch.cat([torch.cat([prior[0], kv[:, :-1, :, :D]], dim=1), kv[..., D:]], dim=2)  # [B, n, 2m, D]
            gate = torch.cat([torch.cat([prior[1], gate[:, :-1, :, :D]], dim=1), gate[..., D:]], dim=2)
        pooled = self.kv_norm((kv * gate.softmax(dim=2, dtype=torch.float32).to(kv.dtype)).sum(dim=2))  # [B, n, D]
        positions = torch.arange(n, device=kv.device) * m + first_position
        angles = positions.float()[:, None] * rope_inv_freq.float()  # [n, d/2]
        return rope_tail(pooled.unsqueeze(2), angles.cos()[:, None], angles.sin()[:, None]).squeeze(2)

    def forward(self, x: torch.Tensor, rope_inv_freq: torch.Tensor) -> torch.Tensor:
        """Keys [B, S // rate, head_dim] of the complete windows of x [B, S, hidden] from position 0 (a partial
        last window gives no key yet)."""
        usable = x.shape[1] // self.rate * self.rate
        kv, gate = self.project(x[:, :usable])
        return self.pool(kv, gate, 0, rope_inv_freq)


def visible_windows(positions: torch.Tensor, n_keys: int, rate: int) -> torch.Tensor:
    """[..., S, n_keys] bool: key w (the window of tokens w * rate ... (w + 1) * rate - 1) is complete by the query
    at each of `positions` [..., S], i.e. w < (position + 1) // rate."""
    return torch.arange(n_keys, device=positions.device) < ((positions + 1) // rate).unsqueeze(-1)


class IndexerScorer(nn.Module):
    """The indexer's per-query head weights: sum_h w_{t,h} * ReLU(q_{t,h} . k_s) / sqrt(index_head_dim)."""

    def __init__(self, hidden_size: int, n_heads: int):
        super().__init__()
        self.weights_proj = nn.Linear(hidden_size, n_heads, bias=False)


class Indexer(Compressor):
    """The lightning indexer: its own overlapping compressor at index_head_dim, and queries from the attention's
    query latent; picks each query's top `index_topk` complete windows (-1 where fewer are complete)."""

    def __init__(self, config: ModelConfig, rate: int):
        super().__init__(config.hidden_size, config.index_head_dim, rate, overlap=True, eps=config.rms_norm_eps)
        self.n_heads, self.index_topk = config.index_n_heads, config.index_topk
        self.q_b_proj = nn.Linear(config.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.scorer = IndexerScorer(config.hidden_size, self.n_heads)

    def select(self, x: torch.Tensor, q_latent: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor,
               cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Top-k window ids [B, S, min(index_topk, T)] (-1: none) for the queries of x [B, S, hidden] with query
        latent q_latent [B, S, q_lora_rank] at `positions` [B, S], among keys [B, T, index_head_dim]."""
        B, S, _ = x.shape
        q = rope_tail(self.q_b_proj(q_latent).view(B, S, self.n_heads, self.head_dim), cos, sin)
        scores = torch.matmul(q.float(), keys.transpose(-1, -2).float().unsqueeze(1))  # [B, S, heads, T]
        scores = F.relu(scores) * self.head_dim ** -0.5
        weights = self.scorer.weights_proj(x).float() * self.n_heads ** -0.5  # [B, S, heads]
        index_scores = (scores * weights.unsqueeze(-1)).sum(dim=2)  # [B, S, T]
        T = keys.shape[1]
        visible = visible_windows(positions, T, self.rate)
        top = index_scores.masked_fill(~visible, float("-inf")).topk(min(self.index_topk, T), dim=-1).indices
        return torch.where(visible.gather(-1, top), top, torch.full_like(top, -1))


class SparseCompressor(Compressor):
    """CSA's compressor (overlapping windows at head_dim) with its indexer."""

    def __init__(self, config: ModelConfig, rate: int):
        super().__init__(config.hidden_size, config.head_dim, rate, overlap=True, eps=config.rms_norm_eps)
        self.indexer = Indexer(config, rate)


def topk_mask(top: torch.Tensor, n_keys: int) -> torch.Tensor:
    """[B, S, n_keys] bool, True at each query's chosen windows `top` [B, S, k] (entries of -1 choose nothing)."""
    chosen = torch.zeros(*top.shape[:-1], n_keys + 1, dtype=torch.bool, device=top.device)
    return chosen.scatter_(-1, torch.where(top >= 0, top, n_keys), True)[..., :n_keys]
