"""Which attention a decoder layer runs, from the config: the one place a new attention kind is chosen."""

from __future__ import annotations

from torch import nn

from ..config import ModelConfig
from .attention import MultiHeadLatentAttention
from .mha import MultiHeadAttention
from .sparse_attention import SparseLatentAttention


def build_attention(config: ModelConfig, layer_idx: int) -> nn.Module:
    """The attention module of layer `layer_idx` (MTP modules count on after the decoder's layers).

    Every kind takes (x, cos, sin, attn_mask, cache) in its forward and declares `cache_widths()`, what it keeps per
    token while decoding (inference/cache.py)."""
    if not config.use_mla:  # DeepSeekMoE 16B, DeepSeek-VL2-Tiny's and DeepSeek-OCR's language models
        return MultiHeadAttention(config)
    if config.index_topk is not None and not config.is_v4:  # DeepSeek-V3.2: every layer's MLA sparse, picked by a lightning indexer
        return SparseLatentAttention(config)
    return MultiHeadLatentAttention(config)
