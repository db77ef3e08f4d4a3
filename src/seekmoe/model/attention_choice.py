"""Which attention a decoder layer runs, from the config: the one place a new attention kind is chosen."""

from __future__ import annotations

from torch import nn

from ..config import ModelConfig
from .attention import MultiHeadLatentAttention
from .mha import MultiHeadAttention
from .sparse_attention import SparseLatentAttention
from .v4_attention import V4Attention


def build_attention(config: ModelConfig, layer_idx: int, rotary: nn.Module | None = None) -> nn.Module:
    """The attention module of layer `layer_idx` (MTP modules count on after the decoder's layers).

    Every kind takes (x, cos, sin, attn_mask, cache) in its forward and declares `cache_widths()`, what it keeps per
    token while decoding (inference/cache.py). DeepSeek-V4's (`layer_types`) also takes the model's rotary module
    (`rotary`: its compressed keys are rotated at their windows' positions); its blocks are v4_block.py's."""
    if config.is_v4:
        if rotary is None:
            raise ValueError("DeepSeek-V4 attention needs the model's V4RotaryEmbedding (rotary=...)")
        return V4Attention(config, layer_idx, rotary)
    if not config.use_mla:  # DeepSeekMoE 16B, DeepSeek-VL2-Tiny's and DeepSeek-OCR's language models
        return MultiHeadAttention(config)
    if config.index_topk is not None and not config.is_v4:  # DeepSeek-V3.2: every layer's MLA sparse, picked by a lightning indexer
        return SparseLatentAttention(config)
    return MultiHeadLatentAttention(config)
