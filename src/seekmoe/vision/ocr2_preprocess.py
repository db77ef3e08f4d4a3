"""Pillow images -> DeepSeek-OCR-2's views, as transformers' DeepseekOcr2ImageProcessor makes them (its Pillow
backend): RGB (transparency over white); a global view resized bicubically (on uint8) so its longer side is
`image_size`, padded to a square with grey (127) centred, and, when the image's longer side passes `tile_size`,
local crops: the image resized to the `columns x rows` grid of tiles (between `min_patches` and `max_patches`
tiles) whose aspect ratio is nearest the image's, cut row by row. Pixels are scaled to [-1, 1].

An image becomes `Ocr2Config.image_tokens(...)` placeholders: its crops' query features, the global view's, one
separator. Who calls it: vision/inference.py (`seekmoe generate --image`, chat, serve) through `ocr2_image_prompt`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .preprocess import to_rgb

BACKGROUND = (127, 127, 127)


def tile_grid(height: int, width: int, tile: int, min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """(columns, rows) of the crop grid: the arrangement with min_tiles..max_tiles tiles whose width/height ratio is
    nearest the image's; on a tie the one with more tiles, while the image's area passes half of theirs."""
    arrangements = sorted(((c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1)
                           if min_tiles <= c * r <= max_tiles), key=lambda g: g[0] * g[1])
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for columns, rows in arrangements:
        diff = abs(aspect - columns / rows)
        if diff < best_diff:
            best, best_diff = (columns, rows), diff
        elif diff == best_diff and area > 0.5 * tile * tile * columns * rows:
            best = (columns, rows)
    return best


def _normalized(image: Image.Image) -> torch.Tensor:
    """[3, H, W] float32 in [-1, 1] of an RGB image ((x / 255 - 0.5) / 0.5)."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    return (pixels.float() * (1 / 255) - 0.5) / 0.5


@dataclass(frozen=True)
class Ocr2ImageProcessor:
    """DeepSeek-OCR-2's preprocessing settings (the release's: 1024-pixel global views, 768-pixel tiles, 2 to 6
    crops for images larger than a tile)."""

    image_size: int = 1024
    tile_size: int = 768
    min_patches: int = 2
    max_patches: int = 6
    crop_to_patches: bool = True

    def global_view(self, image: Image.Image) -> torch.Tensor:
        """[3, S, S]: the whole image, its longer side `image_size`, centred on grey."""
        side = self.image_size if self.crop_to_patches else self.tile_size
        width, height = image.size
        scale = side / max(width, height)
        resized = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BICUBIC)
        longest = max(resized.size)
        canvas = Image.new("RGB", (longest, longest), BACKGROUND)
        w, h = resized.size
        canvas.paste(resized, ((longest - w) // 2 if w < longest else 0, (longest - h) // 2 if h < longest else 0))
        return _normalized(canvas)

    def crops(self, image: Image.Image) -> list[torch.Tensor]:
        """The local crops [3, tile, tile] in row-major order (none for an image within one tile)."""
        width, height = image.size
        if not self.crop_to_patches or max(width, height) <= self.tile_size:
            return []
        t = self.tile_size
        columns, rows = tile_grid(height, width, t, self.min_patches, self.max_patches)
        resized = image.resize((t * columns, t * rows), Image.BICUBIC)
        return [_normalized(resized.crop((c * t, r * t, (c + 1) * t, (r + 1) * t)))
                for r in range(rows) for c in range(columns)]

    def __call__(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """transformers' inputs: `pixel_values` [images, 3, S, S], `num_local_patches` [images] and, when any
        image is cropped, `pixel_values_local` [crops, 3, T, T]."""
        if isinstance(images, Image.Image):
            images = [images]
        views, local, counts = [], [], []
        for image in images:
            rgb = to_rgb(image)
            crops = self.crops(rgb)
            local += crops
            counts.append(len(crops))
            views.append(self.global_view(rgb))
        out = {"pixel_values": torch.stack(views), "num_local_patches": torch.tensor(counts, dtype=torch.long)}
        if local:
            out["pixel_values_local"] = torch.stack(local)
        return out


def processor_for(config) -> Ocr2ImageProcessor:
    """The preprocessing of an Ocr2Config's model: global views of SAM's `image_size`, tiles 3/4 of it (the
    release's 1024 and 768; a config.json does not say the tile size)."""
    size, patch = config.sam_config.image_size, config.sam_config.patch_size
    tile = max(patch, size * 3 // 4 // patch * patch)
    return Ocr2ImageProcessor(image_size=size, tile_size=tile)


def ocr2_image_prompt(text: str, images: list, tokenizer, config, add_bos: bool = True
                      ) -> tuple[list[int], torch.Tensor | None, torch.Tensor | None]:
    """(token ids, packed pixels, layout) of a prompt whose k-th vision.sft.IMAGE_MARK stands for images[k]: each
    becomes its placeholders; the pixels in Ocr2Model.image_features's packed form (ocr2_model.pack_views)."""
    from .ocr2_model import pack_views
    from .sft import IMAGE_MARK, encode_with_images

    marks = text.count(IMAGE_MARK)
    if marks != len(images):
        raise ValueError(f"the prompt has {marks} image positions for {len(images)} images")
    if not images:
        return tokenizer.encode(text, add_bos=add_bos), None, None
    processor = processor_for(config)
    inputs = processor(images)
    counts = [config.image_tokens(processor.image_size, processor.tile_size, int(n))
              for n in inputs["num_local_patches"]]
    flat, layout = pack_views(inputs["pixel_values"], inputs.get("pixel_values_local"), inputs["num_local_patches"])
    return encode_with_images(text, tokenizer, counts, config.image_token_id, add_bos), flat, layout
