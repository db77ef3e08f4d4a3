"""Pillow images -> `pixel_values` and `image_grid_thw`, as Kimi-K2.5's image processor (transformers'
`Kimi_K25ImageProcessor`) makes them: RGB (transparency over white), shrunk bicubically (antialiased, on uint8) until
the image fits `max_patches` patches and `max_patches_per_side` a side, zero-padded at the bottom and right to a
multiple of patch x merge, scaled to [-1, 1] ((x / 255 - 0.5) / 0.5), and cut into patches in raster order.

Who calls it: the vision-language model's callers (sft data, generate, serve); vision/images.py decodes the bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class ImageProcessor:
    """Kimi-K2.5's preprocessing settings (its defaults: 14-pixel patches, 2x2 merge, at most 16384 patches and
    512 patches a side); `placeholders(grid)` is how many language-model tokens an image becomes."""

    patch_size: int = 14
    merge_size: int = 2
    max_patches: int = 16384
    max_patches_per_side: int = 512

    def target_size(self, height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """((resized height, width), (padded height, width)) for an image of height x width pixels: never enlarged,
        shrunk by the tightest of the patch budget and the per-side limit. Kimi-K2.5's arithmetic counts whole
        patches before scaling, so a large image may pass `max_patches` by a fraction of a percent."""
        p = self.patch_size
        patches = max(1, height // p) * max(1, width // p)
        scale = min(1.0, math.sqrt(self.max_patches / patches), self.max_patches_per_side * p / height,
                    self.max_patches_per_side * p / width)
        new_h = min(max(1, int(height * scale)), self.max_patches_per_side * p)
        new_w = min(max(1, int(width * scale)), self.max_patches_per_side * p)
        factor = self.merge_size * p
        return (new_h, new_w), (-(-new_h // factor) * factor, -(-new_w // factor) * factor)

    def placeholders(self, grid_thw: torch.Tensor | list[int]) -> int:
        """Language-model tokens of one image with grid (t, h, w): one per merge x merge block of patches."""
        t, h, w = (int(v) for v in grid_thw)
        return t * h * w // (self.merge_size * self.merge_size)

    def image_tensor(self, image: Image.Image) -> torch.Tensor:
        """One image as normalized pixels [3, H, W] (padded; H and W multiples of patch x merge)."""
        rgb = to_rgb(image)
        pixels = torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1)  # [3, h, w] uint8
        (h, w), (ph, pw) = self.target_size(*pixels.shape[1:])
        # uint8 in, uint8 out: torch's antialiased bicubic on uint8 is the kernel torchvision (and so transformers)
        # runs on the CPU, rounding included.
        pixels = F.interpolate(pixels[None], size=(h, w), mode="bicubic", align_corners=False, antialias=True)[0]
        pixels = F.pad(pixels, (0, pw - w, 0, ph - h), value=0)
        mean = torch.tensor(IMAGE_MEAN, dtype=torch.float32)[:, None, None] * 255.0
        std = torch.tensor(IMAGE_STD, dtype=torch.float32)[:, None, None] * 255.0
        return (pixels.float() - mean) / std

    def __call__(self, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixel_values [patches, 3, p, p], image_grid_thw [images, 3]) for `images`, in order."""
        if isinstance(images, Image.Image):
            images = [images]
        p = self.patch_size
        patches, grids = [], []
        for image in images:
            x = self.image_tensor(image)
            gh, gw = x.shape[1] // p, x.shape[2] // p
            patches.append(x.view(3, gh, p, gw, p).permute(1, 3, 0, 2, 4).reshape(gh * gw, 3, p, p))
            grids.append([1, gh, gw])
        if not patches:
            return torch.zeros(0, 3, p, p), torch.zeros(0, 3, dtype=torch.long)
        return torch.cat(patches), torch.tensor(grids, dtype=torch.long)


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as RGB, any transparency composited over white (as transformers does)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")
