"""Which decoder block a layer is, from the config, and what the body needs with it: the rotary module the blocks
share and how the residual stream enters and leaves them. The one place a model family's block kind is chosen (as
attention_choice.py is for attention); transformer.py builds its body from these without asking which family it is.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .block import DecoderBlock
from .hyper_connections import HyperHead
from .rope import RotaryEmbedding
from .v4_block import V4DecoderBlock
from .v4_rope import V4RotaryEmbedding


def build_rotary(config: ModelConfig) -> nn.Module:
    """The model's rotary module: positions -> (cos, sin) for every block (DeepSeek-V4's also rotates its compressed
    keys, so its attention holds it too)."""
    return V4RotaryEmbedding(config) if config.is_v4 else RotaryEmbedding(config)


def build_block(config: ModelConfig, layer_idx: int, rotary: nn.Module) -> nn.Module:
    """Decoder layer `layer_idx`: DeepSeek-V4's over its hyper-connection streams (v4_block.py), else a pre-norm
    block whose MLP is dense for the first `first_k_dense_replace` layers (block.py). Every kind takes
    (x, cos, sin, attn_mask, cache, token_ids) and returns (x, MoE stats or None), x as `build_streams` lays it out."""
    if config.is_v4:
        return V4DecoderBlock(config, layer_idx, rotary)
    return DecoderBlock(config, config.is_moe_layer(layer_idx), layer_idx)


def build_streams(config: ModelConfig) -> nn.Module:
    """How the residual stream enters and leaves the blocks: `expand(h)` from the embeddings [B, S, hidden] to what
    the blocks carry, and calling it collapses that back to [B, S, hidden] before the final norm. DeepSeek-V4 carries
    `hc_mult` streams (HyperHead, the model's `hc_head` in its checkpoints); every other family one."""
    if config.is_v4:
        return HyperHead(config.hidden_size, config.hc_mult, config.hc_eps, config.rms_norm_eps)
    return SingleStream()


class SingleStream(nn.Module):
    """The one residual stream of a block without hyper-connections: entered and left as it is (no parameters)."""

    def expand(self, h: torch.Tensor) -> torch.Tensor:
        return h

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h
