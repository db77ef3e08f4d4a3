"""DeepSeek-OCR-2's first image encoder: SAM ViT-B with its neck and two downsampling convolutions.

A view [B, 3, S, S] becomes patches (`patch_size` pixels, a learned position grid resampled bicubically to the
view's grid), runs through pre-norm blocks whose attention adds decomposed relative positions (MViTv2: a learned
table per axis, looked up by query-key offset) and is windowed except in `global_attn_indexes`, then a neck (1x1
conv, LayerNorm, 3x3 conv, LayerNorm over channels) and two stride-2 3x3 convolutions: a 1024-pixel view ends as
16x16 = 256 tokens of `downsample_channels[1]`.

Parameter names follow DeepSeek's release (`blocks.{i}.norm1`, `attn.qkv`, `neck.0`..`neck.3`, `net_2`, `net_3`),
which is how transformers writes them to disk. Who calls it: vision/ocr2_encoder.py's Ocr2VisionTower.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .ocr2_config import SamConfig


def relative_table(size: int, table: torch.Tensor) -> torch.Tensor:
    """[size, size, dim]: the embedding of each query-key offset along one axis of a `size`-long grid. A table
    learned for another length (global attention at another resolution) is resampled linearly first."""
    length = 2 * size - 1
    if table.shape[0] != length:
        table = F.interpolate(table.T[None].float(), size=length, mode="linear")[0].T.to(table.dtype)
    offsets = torch.arange(size, device=table.device)
    return table[offsets[:, None] - offsets[None, :] + size - 1]


class SamAttention(nn.Module):
    """Multi-head self-attention over a [B, H, W, C] grid with decomposed relative position biases."""

    def __init__(self, config: SamConfig, size: int):
        """`size`: the side the relative tables are learned for (the window, or the whole grid if global)."""
        super().__init__()
        self.heads = config.num_attention_heads
        head_dim = config.hidden_size // self.heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.use_rel_pos = config.use_rel_pos
        if self.use_rel_pos:
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * size - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * size - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        q, k, v = self.qkv(x).view(B, H * W, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # [B, n, HW, d]
        bias = None
        if self.use_rel_pos:
            # The biases read the unscaled query: q . R[h_q - h_k] + q . R[w_q - w_k].
            grid_q = q.reshape(B, self.heads, H, W, -1)
            rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid_q, relative_table(H, self.rel_pos_h))
            rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid_q, relative_table(W, self.rel_pos_w))
            bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(B, self.heads, H * W, H * W)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(B, H, W, C))


class SamMLP(nn.Module):
    def __init__(self, config: SamConfig):
        super().__init__()
        self.lin1 = nn.Linear(config.hidden_size, config.mlp_dim)
        self.lin2 = nn.Linear(config.mlp_dim, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(F.gelu(self.lin1(x)))


class SamBlock(nn.Module):
    """Pre-norm block; with a window, attention runs inside each `window` x `window` tile of the (zero-padded)
    grid."""

    def __init__(self, config: SamConfig, window: int):
        super().__init__()
        self.window = window
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = SamAttention(config, window or config.grid)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = SamMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        if self.window:
            h = self._windowed_attention(h)
        else:
            h = self.attn(h)
        x = x + h
        return x + self.mlp(self.norm2(x))

    def _windowed_attention(self, h: torch.Tensor) -> torch.Tensor:
        B, H, W, C = h.shape
        w = self.window
        ph, pw = -H % w, -W % w
        h = F.pad(h, (0, 0, 0, pw, 0, ph))  # padded cells are zeros after the norm, as SAM pads
        Hp, Wp = H + ph, W + pw
        tiles = h.view(B, Hp // w, w, Wp // w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, w, w, C)
        tiles = self.attn(tiles)
        h = tiles.view(B, Hp // w, Wp // w, w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)
        return h[:, :H, :W]


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of a [B, C, H, W] map (SAM's LayerNorm2d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SamPatchEmbed(nn.Module):
    def __init__(self, config: SamConfig):
        super().__init__()
        p = config.patch_size
        self.proj = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=p, stride=p)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels).permute(0, 2, 3, 1)  # [B, H, W, C]


class SamEncoder(nn.Module):
    """`forward(pixels [B, 3, S, S])` -> [B, tokens, downsample_channels[1]] (tokens in raster order)."""

    def __init__(self, config: SamConfig):
        super().__init__()
        self.config = config
        self.patch_embed = SamPatchEmbed(config)
        self.pos_embed = (nn.Parameter(torch.zeros(1, config.grid, config.grid, config.hidden_size))
                          if config.use_abs_pos else None)
        self.blocks = nn.ModuleList(SamBlock(config, config.window(i)) for i in range(config.num_hidden_layers))
        out, (mid, last) = config.output_channels, config.downsample_channels
        self.neck = nn.Sequential(nn.Conv2d(config.hidden_size, out, kernel_size=1, bias=False),
                                  ChannelLayerNorm(out, eps=1e-6),
                                  nn.Conv2d(out, out, kernel_size=3, padding=1, bias=False),
                                  ChannelLayerNorm(out, eps=1e-6))
        self.net_2 = nn.Conv2d(out, mid, kernel_size=3, stride=2, padding=1, bias=False)
        self.net_3 = nn.Conv2d(mid, last, kernel_size=3, stride=2, padding=1, bias=False)

    def position_grid(self, height: int, width: int) -> torch.Tensor:
        """[1, height, width, C]: the learned grid, resampled (bicubic, antialiased, in fp32) to another size."""
        grid = self.pos_embed
        if grid.shape[1:3] == (height, width):
            return grid
        resized = F.interpolate(grid.permute(0, 3, 1, 2).float(), size=(height, width), mode="bicubic",
                                align_corners=False, antialias=True)
        return resized.to(grid.dtype).permute(0, 2, 3, 1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels)
        if self.pos_embed is not None:
            x = x + self.position_grid(x.shape[1], x.shape[2])
        for block in self.blocks:
            x = block(x)
        x = self.net_3(self.net_2(self.neck(x.permute(0, 3, 1, 2))))
        return x.flatten(2).transpose(1, 2)
