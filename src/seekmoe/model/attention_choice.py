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
    cls = attention_class(config)
    if cls is V4Attention:
        if rotary is None:
            raise ValueError("DeepSeek-V4 attention needs the model's V4RotaryEmbedding (rotary=...)")
        return V4Attention(config, layer_idx, rotary)
    return cls(config)


def attention_class(config: ModelConfig) -> type[nn.Module]:
    """The attention class of the config's decoder layers (V4's layer kinds are one class)."""
    if config.is_v4:
        return V4Attention
    if not config.use_mla:  # DeepSeekMoE 16B, DeepSeek-VL2-Tiny's and DeepSeek-OCR's language models
        return MultiHeadAttention
    if config.index_topk is not None:  # DeepSeek-V3.2: every layer's MLA sparse, picked by a lightning indexer
        return SparseLatentAttention
    return MultiHeadLatentAttention


def supports_packed_masks(config: ModelConfig) -> bool:
    """Whether the config's attention keeps packed examples apart under a block-diagonal `attn_mask` (SFT packs
    several examples a row only then). An attention class says no with `supports_packed_masks = False`: V4's
    compressed keys pool whole windows from position 0 of the row, across any example boundary."""
    return getattr(attention_class(config), "supports_packed_masks", True)
