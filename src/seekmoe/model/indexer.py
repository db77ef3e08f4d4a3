"""DeepSeek-V3.2's lightning indexer: a few cheap ReLU heads that score every past token for each query, so that
MLA (model/sparse_attention.py) attends to the `index_topk` best tokens only.

Parameter names are DeepSeek's and transformers' (`self_attn.indexer.wq_b`, `wk`, `k_norm`, `weights_proj`).
DeepSeek's kernels also apply a Hadamard rotation to q and k and score in FP8; the rotation is orthogonal (it keeps
every q . k) and FP8 is a speed choice, so the scores here are the exact-arithmetic ones, in fp32, as
transformers computes them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .rope import apply_rope

# The most bytes of per-head scores the indexer holds at once (see LightningIndexer.forward).
SCORE_CHUNK_BYTES = 1 << 28


class LightningIndexer(nn.Module):
    """I[t, s] = sum_j w[t, j] * ReLU(q[t, j] . k[s] / sqrt(index_head_dim)) for query t and past token s.

    The queries (index_n_heads of them) come from MLA's query latent; the one key per token from the hidden state,
    LayerNorm-ed (with a bias, as DeepSeek's checkpoint has it); the per-head weights w from the hidden state.
    RoPE rotates the first qk_rope_head_dim dimensions of q and k as halves (not as the interleaved pairs of MLA).
    A decoder caches the key, index_head_dim values per token.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.index_n_heads
        self.head_dim = config.index_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.wq_b = nn.Linear(config.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(config.hidden_size, self.n_heads, bias=False)
        self.softmax_scale = self.head_dim ** -0.5

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, S, heads, index_head_dim] with its first rope_dim dimensions rotated by position."""
        rot, rest = x.split([self.rope_dim, self.head_dim - self.rope_dim], dim=-1)
        return torch.cat([apply_rope(rot, cos, sin, interleave=False), rest], dim=-1)

    def key(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """What the indexer caches per token: its rotated key [B, S, index_head_dim] of hidden states x [B, S, H]."""
        return self._rotate(self.k_norm(self.wk(x)).unsqueeze(2), cos, sin).squeeze(2)

    def forward(self, x: torch.Tensor, q_latent: torch.Tensor, keys: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
        """Index scores [B, S, T] (fp32) of the queries of x [B, S, H] and q_latent [B, S, q_lora_rank] (MLA's
        normalized query latent) against keys [B, T, index_head_dim] (`key` of every token they may see)."""
        B, S, _ = x.shape
        q = self._rotate(self.wq_b(q_latent).view(B, S, self.n_heads, self.head_dim), cos, sin)
        weights = self.weights_proj(x).float() * self.n_heads ** -0.5  # [B, S, heads]
        keys_t = keys.float().transpose(-1, -2).unsqueeze(1)  # [B, 1, index_head_dim, T]
        # Each head's ReLU comes before the weighted sum, so [B, S, heads, T] is made whole: a few queries at a time,
        # within SCORE_CHUNK_BYTES (a 4K-token sequence of V3.2's 64 heads would need 4 GB at once).
        step = max(1, SCORE_CHUNK_BYTES // (4 * B * self.n_heads * keys.shape[1]))
        out = []
        # The scores in fp32 even under autocast: the top-k choice turns on small score differences.
        with torch.autocast(x.device.type, enabled=False):
            for i in range(0, S, step):
                scores = F.relu(torch.matmul(q[:, i:i + step].float(), keys_t) * self.softmax_scale)  # [B, s, h, T]
                out.append(torch.matmul(weights[:, i:i + step].unsqueeze(-2), scores).squeeze(-2))  # [B, s, T]
        return out[0] if len(out) == 1 else torch.cat(out, dim=1)


def top_k_tokens(index_scores: torch.Tensor, allowed: torch.Tensor, top_k: int) -> torch.Tensor:
    """The `top_k` tokens [B, S, top_k] with the highest index_scores [B, S, T] (the earlier of equal ones) among
    those `allowed` [B or 1, 1, S, T] lets each query see; where fewer are allowed, disallowed ones fill the rest
    (attention masks them out)."""
    masked = index_scores.masked_fill(~allowed[:, 0], float("-inf"))
    # Exact ties are common (a token every head's ReLU zeroes scores 0): a stable sort gives them to the earlier
    # token, so a query picks the same tokens whatever the row it is scored in (a prefill, a decoding step, a batch
    # with longer neighbours). torch.topk breaks ties by an order that changes with the row's length (transformers
    # uses it: the two agree wherever no tie straddles the k-th place).
    return masked.sort(dim=-1, descending=True, stable=True).indices[..., :top_k]


def select_top_k(index_scores: torch.Tensor, allowed: torch.Tensor, top_k: int) -> torch.Tensor:
    """The attention mask [B, 1, S, T] (True = attend) keeping, of the tokens `allowed` [B or 1, 1, S, T] lets each
    query see, the `top_k` of `top_k_tokens`: all of them where there are no more."""
    B, S, T = index_scores.shape
    if T <= top_k:
        return allowed.expand(B, 1, S, T)
    chosen = top_k_tokens(index_scores, allowed, top_k)
    keep = torch.zeros_like(index_scores, dtype=torch.bool).scatter_(-1, chosen, True)
    return (keep & allowed[:, 0]).unsqueeze(1)
