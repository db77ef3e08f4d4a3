"""DeepSeek-V4's Multi-Token Prediction module, as DeepSeek's release ships it (`mtp.{j}.*` in its checkpoint).

V3's module (mtp.py) concatenates the normed embedding and hidden state and projects them with one `eh_proj`. V4
keeps the main model's `hc_mult` residual streams: the module starts from the last block's streams *before* their
collapse, normalizes each stream (`hnorm`) and maps it with `h_proj`, and adds `e_proj` of the normed embedding of
the token ahead (`enorm`) to every stream:

    x = h_proj(hnorm(streams)) + e_proj(enorm(Emb(t_{i+k})))[:, :, None]      # [B, S, hc_mult, H]
    x = Block(x)                                                              # a V4 block over the streams
    logits = head(norm(hc_head(x)))                                           # its own collapse and norm

The block is a V4 decoder block with sliding-window attention only (the release's `compress_ratios` ends with a 0
for it) and learned routing (its router has the `ffn.gate.bias` of a learned layer, no `tid2eid`); the embedding
and the output head are the main model's. The next depth starts from this module's streams (before collapse).

The state passed between depths (and to speculative drafting) is the streams flattened to [B, S, hc_mult * H], so
that code written for V3's [B, S, H] states carries it unchanged (only its width differs: `CausalLM.mtp_state_size`).

Keys (checkpoint_v4.py maps them): `mtp.{j}.` + the release's block names (`attn.*`, `ffn.*`, `attn_norm`,
`ffn_norm`, `hc_attn_{fn,base,scale}`, `hc_ffn_*`) and `enorm`, `hnorm`, `e_proj`, `h_proj`, `norm`,
`hc_head_{fn,base,scale}`; here `shared_head.norm` holds `hc_head` and `norm` (so that `CausalLM.mtp_logits` and
FSDP's unit for it treat V3 and V4 alike). Layout checked against DeepSeek-V4-Flash's published tensor list and
its reference inference code's MTPBlock, and vLLM's deepseek_v4_mtp.py.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..config import ModelConfig
from .hyper_connections import HyperHead
from .moe import MoEStats
from .norm import RMSNorm
from .v4_block import V4DecoderBlock
from .v4_rope import V4RotaryEmbedding

MTP_LAYER_TYPE = "sliding_attention"  # the release's compress_ratios[num_hidden_layers + j] == 0
MTP_MLP_LAYER_TYPE = "moe"  # learned routing: the hash layers are the first num_hash_layers of the main model


def mtp_layer_config(config: ModelConfig) -> ModelConfig:
    """`config` with its per-layer lists extended past the decoder by the MTP modules' kinds (the lists hold one
    entry per decoder layer, which validation checks; the blocks of the MTP modules index them after those)."""
    extended = copy.copy(config)  # a view for building the blocks: no validation of the longer lists
    L, D = config.num_hidden_layers, config.num_nextn_predict_layers
    extended.layer_types = [*config.layer_types[:L], *[MTP_LAYER_TYPE] * D]
    extended.mlp_layer_types = [*config.mlp_layer_types[:L], *[MTP_MLP_LAYER_TYPE] * D]
    return extended


class V4MTPHead(nn.Module):
    """The module's own collapse of its streams and final norm, before the shared LM head: flattened streams
    [..., hc_mult * H] -> [..., H]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.hc_mult, self.hidden_size = config.hc_mult, config.hidden_size
        self.hc_head = HyperHead(config.hidden_size, config.hc_mult, config.hc_eps, config.rms_norm_eps)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        lead = h.shape[:-1]
        streams = h.reshape(-1, 1, self.hc_mult, self.hidden_size)  # HyperHead takes [B, S, n, H]
        return self.norm(self.hc_head(streams).reshape(*lead, self.hidden_size))


class V4MTPModule(V4DecoderBlock):
    """Depth-k prediction over the hyper-connection streams (see the module docstring)."""

    def __init__(self, config: ModelConfig, depth: int, rotary: V4RotaryEmbedding):
        super().__init__(mtp_layer_config(config), config.num_hidden_layers + depth - 1, rotary)
        H, eps = config.hidden_size, config.rms_norm_eps
        self.hc_mult = config.hc_mult
        self.enorm = RMSNorm(H, eps)
        self.hnorm = RMSNorm(H, eps)
        self.e_proj = nn.Linear(H, H, bias=False)
        self.h_proj = nn.Linear(H, H, bias=False)
        self.shared_head = nn.ModuleDict({"norm": V4MTPHead(config)})

    def forward(self, h_prev: torch.Tensor, next_embeds: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: torch.Tensor | None = None, cache=None,
                token_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, MoEStats]:
        """h_prev [B, S, hc_mult * H]: the previous depth's streams (the main model's last block's for depth 1),
        next_embeds [B, S, H] the embeddings of the tokens k ahead (token_ids [B, S]) -> (this module's streams
        [B, S, hc_mult * H], MoE stats). `attn_mask` and `cache` as in `V4DecoderBlock`."""
        streams = h_prev.unflatten(-1, (self.hc_mult, -1))
        x = self.h_proj(self.hnorm(streams)) + self.e_proj(self.enorm(next_embeds)).unsqueeze(-2)
        x, stats = super().forward(x, cos, sin, attn_mask, cache, token_ids)
        return x.flatten(-2), stats
