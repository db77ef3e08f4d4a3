"""DeepSeek-OCR-2's second image encoder and the vision tower that chains both.

The encoder is a stack of Qwen2 decoder layers (RMSNorm, grouped-query attention with biased q/k/v projections and
half-split rotary positions, SwiGLU) without an embedding table. Its input is a view's SAM tokens followed by
learned queries (12x12 for a tile, 16x16 for a global view); the SAM tokens attend to each other in both
directions, each query to every SAM token and to the queries before it (causal). The queries' outputs, after the
final norm, are the view's features.

Parameter names: `layers.{i}.self_attn.q_proj` ..., `norm`, `query_768`, `query_1024`; on disk (DeepSeek's
release, as transformers writes it) `model.qwen2_model.model.model.layers...` and `model.qwen2_model.query_768`.
Who calls it: vision/ocr2_model.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model.norm import RMSNorm
from ..model.rope import apply_rope
from .ocr2_config import QUERIES_768, QUERIES_1024, EncoderConfig, SamConfig
from .ocr2_sam import SamEncoder


class EncoderAttention(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                    config.head_dim)
        self.q_proj = nn.Linear(config.hidden_size, self.heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        q = apply_rope(self.q_proj(x).view(B, S, self.heads, self.head_dim), cos, sin, interleave=False)
        k = apply_rope(self.k_proj(x).view(B, S, self.kv_heads, self.head_dim), cos, sin, interleave=False)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, heads, S, head_dim]
        v = self.v_proj(x).view(B, S, self.kv_heads, self.head_dim).transpose(1, 2)
        groups = self.heads // self.kv_heads
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1))


class EncoderMLP(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class EncoderLayer(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = EncoderAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = EncoderMLP(config)

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


def query_mask(n_image: int, n_queries: int, device) -> torch.Tensor:
    """[S, S] boolean (True: may attend): image tokens see all image tokens, queries see all image tokens and the
    queries up to themselves."""
    S = n_image + n_queries
    i = torch.arange(S, device=device)
    causal = i[None, :] <= i[:, None]
    both_image = (i[:, None] < n_image) & (i[None, :] < n_image)
    return causal | both_image


class Ocr2Encoder(nn.Module):
    """`forward(tokens [B, P, hidden])` (a view's SAM tokens) -> [B, queries, hidden]."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.query_768 = nn.Embedding(QUERIES_768, config.hidden_size)
        self.query_1024 = nn.Embedding(QUERIES_1024, config.hidden_size)

    def rotary(self, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [length, 1, head_dim / 2] of positions 0..length-1 in fp32, as model/rope.py's apply_rope
        takes them (computed here, not held in buffers: nothing for a meta-device build to lose)."""
        d = self.config.head_dim
        inv_freq = 1.0 / (self.config.rope_theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float) / d))
        angles = torch.arange(length, device=device, dtype=torch.float)[:, None, None] * inv_freq
        return angles.cos(), angles.sin()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        B, P, _ = tokens.shape
        queries = (self.query_768 if P <= QUERIES_768 else self.query_1024).weight
        x = torch.cat([tokens, queries.to(tokens.dtype).expand(B, -1, -1)], dim=1)
        cos, sin = self.rotary(x.shape[1], x.device)
        mask = query_mask(P, queries.shape[0], x.device)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.norm(x)[:, P:]


class Ocr2VisionTower(nn.Module):
    """SAM, then the encoder: `forward(pixels [B, 3, S, S])` -> [B, queries, encoder hidden]."""

    def __init__(self, sam_config: SamConfig, encoder_config: EncoderConfig):
        super().__init__()
        self.sam_model = SamEncoder(sam_config)
        self.encoder = Ocr2Encoder(encoder_config)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.sam_model(pixels))
