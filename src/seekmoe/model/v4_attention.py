"""DeepSeek-V4 attention (paper section 2.3): one layer of `config.layer_types`.

Every layer attends over a sliding window of its last `sliding_window` tokens through a single KV head of
`head_dim` (the key is the value). Compressed layers add keys compressed from windows of `compress_rates[type]`
tokens (v4_compressor.py): every complete window for heavily compressed attention (HCA), the indexer's top
`index_topk` windows per query for compressed sparse attention (CSA). A learned sink per head takes part in each
softmax and is dropped after; the value's rope tail is rotated back at the query's position; the heads go out
through `o_groups` low-rank groups (o_a_proj) mixed by o_b_proj.

Sliding-window layers rotate with the main rope, compressed ones (and their compressors) with the compress rope
(v4_rope.py). Without a cache the windows start at position 0 of the sequence.

Decoding runs on either of two caches. `V4LayerCache` (v4_cache.py) is the compact one V4 is built for, the last
window and the compressed keys (what `seekmoe info` counts); it is eager and keeps a batch's sequences at the same
positions. The engine's `DecodeCache` (inference/cache.py) holds what `cache_widths` names per token (the key and
the compressors' projections) and pools the complete windows again each step (`forward_slots`), so that continuous
batching's slots may each be at their own position: simpler, compilable shapes, more bytes per token.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .hyper_connections import unweighted_rms_norm
from .norm import RMSNorm
from .v4_compressor import Compressor, SparseCompressor, topk_mask, visible_windows
from .v4_rope import V4RotaryEmbedding, rope_tail


class GroupedLinear(nn.Linear):
    """A block-diagonal linear: input group g [in_features] -> output group g [out_features / n_groups], weight
    [out_features, in_features] stored as transformers' `o_a_proj` does (group g's rows together)."""

    def __init__(self, in_features: int, out_features: int, n_groups: int):
        super().__init__(in_features, out_features, bias=False)
        self.n_groups = n_groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., n_groups, in_features] -> [..., n_groups, out_features / n_groups]."""
        w = self.weight.view(self.n_groups, -1, self.in_features)  # [g, out/g, in]
        return torch.einsum("...gi,goi->...go", x, w)


class V4Attention(nn.Module):
    """Sliding-window attention over one shared KV head, with compressed keys (CSA or HCA) by layer type."""

    # Compressed windows start at position 0 of the row and would span packed examples: one example a row (SFT
    # reads this through model.attention_choice.supports_packed_masks).
    supports_packed_masks = False

    def __init__(self, config: ModelConfig, layer_idx: int, rotary: V4RotaryEmbedding):
        super().__init__()
        self.config = config
        # The model's rotary module, not a submodule of this one (its buffer is the model's): the compressed keys
        # are rotated at their windows' positions, which the per-token cos/sin of a decoding step do not cover.
        object.__setattr__(self, "rotary", rotary)
        self.layer_type = config.layer_types[layer_idx]
        self.rope_index = 0 if self.layer_type == "sliding_attention" else 1  # main or compress rope
        self.n_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.sliding_window = config.sliding_window
        H, D, eps = config.hidden_size, config.head_dim, config.rms_norm_eps
        self.q_a_proj = nn.Linear(H, config.q_lora_rank, bias=False)
        self.q_a_norm = RMSNorm(config.q_lora_rank, eps)
        self.q_b_proj = nn.Linear(config.q_lora_rank, self.n_heads * D, bias=False)
        self.kv_proj = nn.Linear(H, D, bias=False)
        self.kv_norm = RMSNorm(D, eps)
        self.o_a_proj = GroupedLinear(self.n_heads * D // config.o_groups, config.o_groups * config.o_lora_rank,
                                      config.o_groups)
        self.o_b_proj = nn.Linear(config.o_groups * config.o_lora_rank, H, bias=False)
        self.sinks = nn.Parameter(torch.empty(self.n_heads))
        self.compressor: Compressor | None = None
        if self.layer_type == "compressed_sparse_attention":
            self.compressor = SparseCompressor(config, config.compress_rates[self.layer_type])
        elif self.layer_type == "heavily_compressed_attention":
            self.compressor = Compressor(H, D, config.compress_rates[self.layer_type], overlap=False, eps=eps)
        self.softmax_scale = D ** -0.5

    def cache_widths(self) -> dict[str, int]:
        """What the engine's per-token cache (inference/cache.py) keeps: the key, and each compressor's kv and gate
        projections (its windows are pooled again from them every step, so that every slot of a batch may be at
        its own position). model/v4_cache.py is the compact cache (compressed keys only) of eager decoding."""
        widths = {"kv": self.head_dim}
        if self.compressor is not None:
            width = self.compressor.kv_proj.out_features
            widths.update(c_kv=width, c_gate=width)
            if isinstance(self.compressor, SparseCompressor):
                width = self.compressor.indexer.kv_proj.out_features
                widths.update(i_kv=width, i_gate=width)
        return widths

    @torch.no_grad()
    def reset_parameters(self, std: float) -> None:
        """Zero sinks (transformers' initialization; the linears and norms are initialized as every other one)."""
        self.sinks.zero_()

    def query(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(q [B, S, heads, head_dim] normalized per head, rope tail rotated; the query latent [B, S, q_lora_rank],
        which the indexer reads too)."""
        B, S, _ = x.shape
        q_latent = self.q_a_norm(self.q_a_proj(x))
        q = unweighted_rms_norm(self.q_b_proj(q_latent).view(B, S, self.n_heads, self.head_dim),
                                self.config.rms_norm_eps)
        return rope_tail(q, cos, sin), q_latent

    def key(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The shared key/value of each token [B, S, head_dim]: normalized, rope tail rotated."""
        return rope_tail(self.kv_norm(self.kv_proj(x)).unsqueeze(2), cos, sin).squeeze(2)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn_mask: torch.Tensor | None = None,
                cache=None) -> torch.Tensor:
        """x [B, S, hidden] with cos/sin [2, ..., S, 1, rope_dim / 2] (main, compress: V4RotaryEmbedding) -> the
        attention output [B, S, hidden]. `attn_mask` [B, 1, S, S] (True = may attend), if given, must be causal:
        the compressed keys cover whole windows from position 0, across any packed examples (ValueError)."""
        B, S, _ = x.shape
        cos_l, sin_l = cos[self.rope_index], sin[self.rope_index]
        q, q_latent = self.query(x, cos_l, sin_l)
        kv = self.key(x, cos_l, sin_l)  # [B, S, D]
        if cache is not None and hasattr(cache, "update"):
            return self.forward_slots(x, q, q_latent, kv, cos_l, sin_l, cache)
        first = key_first = 0  # positions of the first query and of the first key
        if cache is not None:  # V4LayerCache (v4_cache.py): x holds the new tokens only
            first = cache.seen
            attn_mask = None  # every sequence of the batch at the same positions: causal + window say it all
            kv, key_first = cache.keys(kv)
        positions = torch.arange(first, first + S, device=x.device).expand(B, S)
        i = positions.unsqueeze(-1)
        j = torch.arange(key_first, key_first + kv.shape[1], device=x.device).view(1, 1, -1)
        visible = (j <= i) & (j > i - self.sliding_window)  # [B, S, keys]
        if attn_mask is not None and not bool((attn_mask[:, 0] | (j > i)).all()):
            # Packed examples (SFT): the compressed windows would span several examples.
            raise ValueError("DeepSeek-V4 attention takes one sequence per row: attn_mask hides causal pairs "
                             "(packed examples), which its compressed keys cannot respect; pack one example a row")
        keys = kv
        if self.compressor is not None:
            inv_freq = self.rotary.inv_freq[1]
            if cache is None:
                compressed = self.compressor(x, inv_freq)  # [B, T, D]
            else:
                compressed = cache.compressor.step(self.compressor, x, inv_freq)
            T = compressed.shape[1]
            seen = visible_windows(positions, T, self.compressor.rate)  # [B, S, T]
            if isinstance(self.compressor, SparseCompressor):
                indexer = self.compressor.indexer
                index_keys = indexer(x, inv_freq) if cache is None else cache.indexer.step(indexer, x, inv_freq)
                top = indexer.select(x, q_latent, index_keys, positions, cos_l, sin_l)
                seen = seen & topk_mask(top, T)
            keys = torch.cat([kv, compressed], dim=1)
            visible = torch.cat([visible, seen], dim=-1)
        out = self.attend(q, keys, visible)
        return self.output(out, cos_l, sin_l)

    def forward_slots(self, x: torch.Tensor, q: torch.Tensor, q_latent: torch.Tensor, kv: torch.Tensor,
                      cos: torch.Tensor, sin: torch.Tensor, cache) -> torch.Tensor:
        """One step of the engine's cache (a CacheLayer: every slot at its own `positions` [B, S], `attn_mask`
        [B, 1, S, T] over its cached tokens): the window from the cached keys, the compressed keys pooled again from
        the cached projections (a window counts for a query once complete, so stale columns never do)."""
        new = {"kv": kv}
        if self.compressor is not None:
            new["c_kv"], new["c_gate"] = self.compressor.project(x)
            if isinstance(self.compressor, SparseCompressor):
                new["i_kv"], new["i_gate"] = self.compressor.indexer.project(x)
        got = cache.update(**new)
        keys, positions = got["kv"], cache.positions
        T = keys.shape[1]
        j = torch.arange(T, device=x.device).view(1, 1, -1)
        visible = cache.attn_mask[:, 0] & (j > positions.unsqueeze(-1) - self.sliding_window)
        if self.compressor is not None:
            inv_freq, m = self.rotary.inv_freq[1], self.compressor.rate
            usable = T // m * m
            compressed = self.compressor.pool(got["c_kv"][:, :usable], got["c_gate"][:, :usable], 0, inv_freq)
            seen = visible_windows(positions, compressed.shape[1], m)
            if isinstance(self.compressor, SparseCompressor):
                indexer = self.compressor.indexer
                index_keys = indexer.pool(got["i_kv"][:, :usable], got["i_gate"][:, :usable], 0, inv_freq)
                top = indexer.select(x, q_latent, index_keys, positions, cos, sin)
                seen = seen & topk_mask(top, compressed.shape[1])
            keys = torch.cat([keys, compressed.to(keys.dtype)], dim=1)
            visible = torch.cat([visible, seen], dim=-1)
        return self.output(self.attend(q, keys, visible), cos, sin)

    def attend(self, q: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Softmax attention of q [B, S, heads, D] over keys = values [B, T, D] where `visible` [B, S, T], each
        head's sink one more logit in its softmax: [B, S, heads, D]."""
        q = q.transpose(1, 2)  # [B, heads, S, D]
        scores = torch.matmul(q, keys.unsqueeze(1).transpose(-1, -2)) * self.softmax_scale  # [B, heads, S, T]
        scores = scores.masked_fill(~visible.unsqueeze(1), float("-inf"))
        sinks = self.sinks.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        logits = torch.cat([scores, sinks], dim=-1)
        logits = logits - logits.max(dim=-1, keepdim=True).values
        probs = logits.softmax(dim=-1)[..., :-1].to(keys.dtype)
        return torch.matmul(probs, keys.unsqueeze(1)).transpose(1, 2)

    def output(self, out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The heads' outputs [B, S, heads, D], their rope tails rotated back to the query's position, through the
        grouped low-rank output projection: [B, S, hidden]."""
        B, S = out.shape[:2]
        out = rope_tail(out, cos, -sin)
        grouped = self.o_a_proj(out.reshape(B, S, self.config.o_groups, -1)).flatten(2)
        return self.o_b_proj(grouped)
