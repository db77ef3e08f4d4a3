"""MoonViT, Kimi-K2.5's vision tower, and the projector that turns its merged patches into language-model tokens.

An image arrives as `pixel_values` [patches, 3, patch, patch] (vision/preprocess.py cuts it in raster order) and
its `grid_thw` row (1, h, w) in patches. The tower embeds each patch, adds a learned position grid resampled
(bicubic) to the image's h x w, runs pre-norm blocks whose attention stays inside each image and rotates queries
and keys by the patch's (row, column) (2-D RoPE), and groups every merge_kernel_size (2x2) patches into one token.

Parameter names are Kimi-K2.5's on disk (`vision_tower.encoder.blocks.{i}.wqkv`, `mm_projector.proj.0`, ...): the
fused qkv rotates adjacent pairs, as its checkpoint was trained, so weights load without any permutation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model.norm import RMSNorm
from .config import VisionConfig, VisionLanguageConfig


def check_grid(grid_thw: torch.Tensor, n_patches: int, merge_kernel_size: tuple[int, int]) -> list[tuple[int, int]]:
    """The (h, w) of each image of `grid_thw` [images, 3], checked: one frame each, h and w multiples of the merge
    kernel, and h * w patches in all matching pixel_values. ValueError naming what differs."""
    if grid_thw.dim() != 2 or grid_thw.shape[1] != 3:
        raise ValueError(f"image_grid_thw must be [images, 3] (t, h, w), got shape {tuple(grid_thw.shape)}")
    kh, kw = merge_kernel_size
    sizes = []
    for i, (t, h, w) in enumerate(grid_thw.tolist()):
        if t != 1:
            raise ValueError(f"image_grid_thw[{i}] has t={t}: expected 1 (images; video is not supported)")
        if h < 1 or w < 1 or h % kh or w % kw:
            raise ValueError(f"image_grid_thw[{i}] is {h}x{w} patches: expected positive multiples of the merge "
                             f"kernel {kh}x{kw}")
        sizes.append((int(h), int(w)))
    total = sum(h * w for h, w in sizes)
    if total != n_patches:
        raise ValueError(f"image_grid_thw describes {total} patches but pixel_values holds {n_patches}")
    return sizes


class PatchEmbed(nn.Module):
    """Each patch's linear embedding (a convolution with stride = kernel = patch) plus the learned position grid
    [pos_emb_height, pos_emb_width, hidden] resampled bicubically to the image's own grid."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        p = config.patch_size
        self.proj = nn.Conv2d(3, config.hidden_size, kernel_size=p, stride=p)
        self.pos_emb = nn.Module()
        self.pos_emb.weight = nn.Parameter(torch.zeros(config.pos_emb_height, config.pos_emb_width,
                                                       config.hidden_size))

    def forward(self, pixel_values: torch.Tensor, sizes: list[tuple[int, int]]) -> torch.Tensor:
        """pixel_values [N, 3, p, p] -> [N, hidden]."""
        x = self.proj(pixel_values.to(self.proj.weight.dtype)).flatten(1)
        table = self.pos_emb.weight
        grids = []
        for h, w in sizes:
            if (h, w) == tuple(table.shape[:2]):
                grids.append(table.flatten(0, 1))
                continue
            # align_corners=False, border taps clamped: the resampling Kimi-K2.5 was trained with.
            grid = F.interpolate(table.permute(2, 0, 1)[None], size=(h, w), mode="bicubic", align_corners=False)
            grids.append(grid[0].permute(1, 2, 0).flatten(0, 1))
        return x + torch.cat(grids).to(x.dtype)


def sincos_position_grid(height: int, width: int, dim: int) -> torch.Tensor:
    """[height, width, dim]: a 2-D sine-cosine position table (MAE's fixed embedding, at low frequencies), a fresh
    tower's position grid: the first half of the channels a function of the row, the second half the same function
    of the column, so a cell's code is a row part plus a column part and stays smooth when resampled to a smaller
    image. Channels past a multiple of 4 are zero; values lie in [-1, 1]."""
    quarter = dim // 4
    # angle k * pi / 2 across the table for k = 1..quarter: the lowest rises monotonically from one edge to the other
    # (top tells from bottom on any resampled grid), the highest repeats every 4 / quarter of the table.
    freqs = torch.arange(1, quarter + 1, dtype=torch.float32) * torch.pi / 2

    def axis(n: int) -> torch.Tensor:  # [n, 2 * quarter]
        angle = (torch.arange(n, dtype=torch.float32) + 0.5)[:, None] / n * freqs
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    rows = axis(height)[:, None, :].expand(height, width, 2 * quarter)
    cols = axis(width)[None, :, :].expand(height, width, 2 * quarter)
    return F.pad(torch.cat([rows, cols], dim=2), (0, dim - 4 * quarter))


class Rope2D(nn.Module):
    """2-D rotary embedding: head_dim / 2 rotated pairs, alternately by the patch's column and row times
    the same head_dim / 4 frequencies (pair 2j by column * f_j, pair 2j + 1 by row * f_j)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.head_dim, self.theta = config.head_dim, config.rope_theta
        self.register_buffer("inv_freq", torch.empty(self.head_dim // 4), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Recompute the frequencies (a non-persistent buffer: loading from the meta device leaves it empty)."""
        quarter = torch.arange(self.head_dim // 4, dtype=torch.float32, device=self.inv_freq.device)
        self.inv_freq.copy_(1.0 / (self.theta ** (quarter * 4 / self.head_dim)))

    def forward(self, sizes: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each [N, head_dim / 2] for the N patches of images of `sizes`, raster order."""
        angles = []
        for h, w in sizes:
            rows = torch.arange(h, device=self.inv_freq.device).repeat_interleave(w).float()
            cols = torch.arange(w, device=self.inv_freq.device).repeat(h).float()
            a = torch.stack([cols[:, None] * self.inv_freq, rows[:, None] * self.inv_freq], dim=-1)  # [hw, q, 2]
            angles.append(a.flatten(1))
        a = torch.cat(angles)
        return a.cos(), a.sin()


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, heads, head_dim] with adjacent pairs (x0, x1), (x2, x3), ... rotated by cos/sin [N, head_dim / 2],
    in fp32."""
    x_ = x.float().unflatten(-1, (-1, 2))  # [N, heads, head_dim / 2, 2]
    a, b = x_[..., 0], x_[..., 1]
    c, s = cos[:, None], sin[:, None]
    return torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2).to(x.dtype)


class VisionBlock(nn.Module):
    """Pre-LayerNorm block: attention within each image (fused qkv, 2-D RoPE), then a GELU(tanh) MLP."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        d = config.hidden_size
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.norm0 = nn.LayerNorm(d, eps=1e-5)
        self.norm1 = nn.LayerNorm(d, eps=1e-5)
        self.wqkv = nn.Linear(d, 3 * d)
        self.wo = nn.Linear(d, d)
        self.mlp = nn.Module()
        self.mlp.fc0 = nn.Linear(d, config.intermediate_size)
        self.mlp.fc1 = nn.Linear(config.intermediate_size, d)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """x [N, hidden] holding the images' patches one after the other (`lengths` patches each)."""
        N = x.shape[0]
        q, k, v = self.wqkv(self.norm0(x)).view(N, 3, self.num_heads, self.head_dim).unbind(1)
        q, k = rotate_pairs(q, cos, sin), rotate_pairs(k, cos, sin)
        # One image at a time: a block-diagonal mask over all patches would cost N^2 memory for nothing.
        outs = [F.scaled_dot_product_attention(qi.transpose(0, 1), ki.transpose(0, 1), vi.transpose(0, 1))
                .transpose(0, 1) for qi, ki, vi in zip(q.split(lengths), k.split(lengths), v.split(lengths))]
        x = x + self.wo(torch.cat(outs).reshape(N, -1))
        return x + self.mlp.fc1(F.gelu(self.mlp.fc0(self.norm1(x)), approximate="tanh"))


class VisionTower(nn.Module):
    """MoonViT: pixel_values [N, 3, p, p] and grid_thw [images, 3] -> merged patches [N / k, k, hidden], k the
    merge kernel's size, each image's tokens in raster order of the merged grid."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.encoder = nn.Module()
        self.encoder.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.num_hidden_layers))
        self.encoder.final_layernorm = nn.LayerNorm(config.hidden_size, eps=1e-5)
        self.rope = Rope2D(config)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, self.config.patch_size,
                                                                       self.config.patch_size):
            p = self.config.patch_size
            raise ValueError(f"pixel_values must be [patches, 3, {p}, {p}], got shape {tuple(pixel_values.shape)}")
        sizes = check_grid(grid_thw, pixel_values.shape[0], self.config.merge_kernel_size)
        x = self.patch_embed(pixel_values, sizes)
        cos, sin = self.rope(sizes)
        lengths = [h * w for h, w in sizes]
        for block in self.encoder.blocks:
            x = block(x, cos, sin, lengths)
        x = self.encoder.final_layernorm(x)
        return merge_patches(x, sizes, self.config.merge_kernel_size)


def merge_patches(x: torch.Tensor, sizes: list[tuple[int, int]], kernel: tuple[int, int]) -> torch.Tensor:
    """x [N, hidden] in raster order per image -> [N / (kh * kw), kh * kw, hidden]: each kh x kw block of patches
    becomes one token (blocks in raster order, patches inside a block in raster order)."""
    kh, kw = kernel
    out = []
    for xi, (h, w) in zip(x.split([h * w for h, w in sizes]), sizes):
        xi = xi.view(h // kh, kh, w // kw, kw, -1).permute(0, 2, 1, 3, 4)
        out.append(xi.reshape(-1, kh * kw, x.shape[-1]))
    return torch.cat(out)


class Projector(nn.Module):
    """Kimi-K2.5's patch-merger projector: LayerNorm over each patch, the kh * kw patches of a token concatenated,
    then Linear -> GELU -> Linear to the language model's width; with `projection_output_norm` (seekmoe's own
    towers), an RMSNorm after it (`post_norm`)."""

    def __init__(self, config: VisionLanguageConfig):
        super().__init__()
        d = config.vision_config.hidden_size
        merged = d * config.merged_patches
        self.pre_norm = nn.LayerNorm(d, eps=config.projection_layer_norm_eps)
        self.proj = nn.Sequential(nn.Linear(merged, merged), nn.GELU(),
                                  nn.Linear(merged, config.text_config.hidden_size))
        self.post_norm = RMSNorm(config.text_config.hidden_size) if config.projection_output_norm else None

    def forward(self, merged: torch.Tensor) -> torch.Tensor:
        """merged [T, k, hidden_vision] -> [T, hidden_text]."""
        x = self.proj(self.pre_norm(merged).flatten(1))
        return x if self.post_norm is None else self.post_norm(x)
