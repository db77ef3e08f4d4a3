"""DeepSeek Sparse Attention (DSA, DeepSeek-V3.2): MLA whose queries attend only to the `index_topk` past tokens
the lightning indexer (model/indexer.py) picks for each of them.

MLA's own math (model/attention.py) computes the attention; this module adds the indexer, the top-k mask, the
indexer's key beside the latent in the decoding cache, and the indexer's training signal: the KL divergence from
the main attention's distribution (summed over heads, L1-normalized) to the indexer's (V3.2 report, section 2.1.1).
The indexer reads its inputs detached from the main model's graph, so the language-model loss trains the model
and the KL trains the indexer, each alone. The training stages that use it are in train/indexer_warmup.py.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .attention import ABSORB_MAX_QUERIES, CacheLayer, MultiHeadLatentAttention
from .indexer import LightningIndexer, select_top_k, top_k_tokens

# How the indexer takes part in a forward (`SparseLatentAttention.indexer_stage`, set once per run by a training
# stage, train/indexer_warmup.py): None, inference and ordinary training, sparse attention and no indexer loss;
# "warmup", dense attention, the indexer learning the full causal distribution; "sparse", sparse attention, the
# indexer learning the distribution over the tokens it selected.
INDEXER_STAGES = (None, "warmup", "sparse")


class SparseLatentAttention(MultiHeadLatentAttention):
    """MLA over the index_topk tokens of the lightning indexer's choice, per query (all of them while a query has
    no more than index_topk to see: short sequences attend as dense MLA does)."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.indexer = LightningIndexer(config)
        self.index_topk = config.index_topk
        self.indexer_stage: str | None = None
        # The mean KL of the last training forward (a tensor with a gradient for the indexer only), read by the
        # training stage's objective; None outside the indexer's training stages.
        self.indexer_loss: torch.Tensor | None = None

    def cache_widths(self) -> dict[str, int]:
        """What a decoder caches per token: MLA's latent and rope key, and the indexer's key."""
        return {"c_kv": self.kv_lora_rank, "k_pe": self.qk_rope_head_dim, "index_k": self.indexer.head_dim}

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: torch.Tensor | None = None, cache: CacheLayer | None = None) -> torch.Tensor:
        """As `MultiHeadLatentAttention.forward`, each query seeing only its top-k of the tokens it may see."""
        S = x.shape[1]
        q_latent = self.q_a_layernorm(self.q_a_proj(x))
        q_nope, q_pe = self.split_query(self.q_b_proj(q_latent), cos, sin)
        c_kv, k_pe = self.latent(x, cos, sin)
        # Detached: the language-model loss must not train the indexer, nor the indexer's KL the model.
        x_index, q_index = x.detach(), q_latent.detach()
        index_k = self.indexer.key(x_index, cos, sin)
        if cache is not None:
            got = cache.update(c_kv=c_kv, k_pe=k_pe, index_k=index_k)
            c_kv, k_pe, index_k = got["c_kv"], got["k_pe"], got["index_k"]
        T = c_kv.shape[1]
        allowed = attn_mask if attn_mask is not None else _causal(S, T, x.device)
        learn = self.training and self.indexer_stage is not None
        dense = self.indexer_stage == "warmup"
        if T <= self.index_topk and not learn:
            mask = allowed  # every query sees all it may: dense MLA
            fused_causal = attn_mask is None or getattr(cache, "causal", False)
        else:
            index_scores = self.indexer(x_index, q_index, index_k, cos, sin)  # [B, S, T]
            if cache is not None and S <= ABSORB_MAX_QUERIES and not dense and not learn:  # decoding
                chosen = top_k_tokens(index_scores, allowed, self.index_topk)
                return self.attend_selected(q_nope, q_pe, c_kv, k_pe, chosen, allowed)
            mask = allowed if dense else select_top_k(index_scores, allowed, self.index_topk)
            fused_causal = dense and attn_mask is None
            if learn:
                self.indexer_loss = self._indexer_kl(q_nope, q_pe, c_kv, k_pe, index_scores, mask)
        if cache is not None and S <= ABSORB_MAX_QUERIES:
            return self.attend_latent(q_nope, q_pe, c_kv, k_pe, mask)
        return self.attend_expanded(q_nope, q_pe, c_kv, k_pe, None if fused_causal else mask)

    def attend_selected(self, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor,
                        chosen: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """Absorbed attention (`attend_latent`) of each query over only its chosen tokens [B, S, k], gathered from
        the cached c_kv [B, T, kv_lora_rank] and k_pe [B, T, rope_dim]: a decoding step's attention costs index_topk
        tokens, whatever the context. Each query is its own row; `allowed` [B or 1, 1, S, T] masks chosen tokens
        it may not see (where it sees fewer than k)."""
        B, S, h, _ = q_nope.shape
        rows = torch.arange(B, device=chosen.device)[:, None, None]
        c_sel, pe_sel = c_kv[rows, chosen].flatten(0, 1), k_pe[rows, chosen].flatten(0, 1)  # [B * S, k, ...]
        valid = allowed[:, 0].expand(B, S, -1).gather(-1, chosen).view(B * S, 1, 1, -1)
        out = self.attend_latent(q_nope.reshape(B * S, 1, h, -1), q_pe.reshape(B * S, 1, h, -1), c_sel, pe_sel,
                                 valid)
        return out.view(B, S, -1)

    def _indexer_kl(self, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor,
                    index_scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean over queries of KL(p || softmax(index_scores)) over the tokens `mask` [B, 1, S, T] keeps, where p
        is the main attention summed over heads and L1-normalized (a target: no gradient)."""
        with torch.no_grad():
            p = self.attention_probs(q_nope, q_pe, c_kv, k_pe, mask).mean(dim=1)  # [B, S, T]
        keep = mask[:, 0].expand_as(index_scores)
        log_q = index_scores.masked_fill(~keep, float("-inf")).log_softmax(dim=-1).masked_fill(~keep, 0.0)
        return (torch.xlogy(p, p) - p * log_q).sum(dim=-1).mean()


def _causal(S: int, T: int, device: torch.device) -> torch.Tensor:
    """[1, 1, S, T], True where query i (the (T - S + i)-th token) may see token j: j <= T - S + i."""
    return torch.ones(S, T, dtype=torch.bool, device=device).tril(T - S)[None, None]


def indexer_modules(model: nn.Module) -> list[SparseLatentAttention]:
    """Every sparse attention layer of `model` (main blocks, then MTP modules)."""
    return [m for m in model.modules() if isinstance(m, SparseLatentAttention)]
