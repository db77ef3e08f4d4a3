"""Pillow images -> DeepSeek-OCR-2's views, as transformers' DeepseekOcr2ImageProcessor makes them (its Pillow
backend): RGB (transparency over white); a global view resized bicubically (on uint8) so its longer side is
`image_size`, padded to a square with `background_color` (grey 127) centred, and, when the image's longer side passes
`tile_size`, local crops: the image resized to the `columns x rows` grid of tiles (between `min_patches` and
`max_patches` tiles) whose aspect ratio is nearest the image's, cut row by row. Pixels are scaled to [0, 1] and
normalized by `image_mean` / `image_std` (0.5: [-1, 1]).

A folder's `preprocessor_config.json` (what transformers' processor `save_pretrained` writes) sets these; without
one, `default_processor` derives them from config.json. An image becomes `Ocr2Config.image_tokens(...)` placeholders:
its crops' query features, the global view's, one separator. Who calls it: vision/ocr2_checkpoint.py (reads and
writes the file), Ocr2Config.image_processor (prompts for generate, chat, serve; analyze's chats).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .preprocess import to_rgb

BACKGROUND = (127, 127, 127)
PREPROCESSOR_FILE = "preprocessor_config.json"
# Settings of transformers' processor that seekmoe computes only one way: (key, the value it must have).
_FIXED = (("do_resize", True), ("do_rescale", True), ("do_normalize", True), ("do_convert_rgb", True),
          ("resample", 3), ("rescale_factor", 1 / 255))


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


def _normalized(image: Image.Image, mean: tuple, std: tuple) -> torch.Tensor:
    """[3, H, W] float32 of an RGB image: (x / 255 - mean) / std per channel."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    mean_, std_ = (torch.tensor(v, dtype=torch.float32)[:, None, None] for v in (mean, std))
    return (pixels.float() * (1 / 255) - mean_) / std_


def _side(value, name: str, source: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 8192:
        raise ValueError(f"{source}: {name}={value!r}: expected an integer in [1, 8192] (pixels)")
    return value


def _triple(value, name: str, source: str, low: float, high: float) -> tuple:
    if (not isinstance(value, (list, tuple)) or len(value) != 3
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and low <= v <= high
                       and math.isfinite(v) for v in value)):
        raise ValueError(f"{source}: {name}={value!r}: expected three numbers in [{low}, {high}] (R, G, B)")
    return tuple(value)


@dataclass(frozen=True)
class Ocr2ImageProcessor:
    """DeepSeek-OCR-2's preprocessing settings (the release's: 1024-pixel global views, 768-pixel tiles, 2 to 6
    crops for images larger than a tile)."""

    image_size: int = 1024
    tile_size: int = 768
    min_patches: int = 2
    max_patches: int = 6
    crop_to_patches: bool = True
    image_mean: tuple = (0.5, 0.5, 0.5)
    image_std: tuple = (0.5, 0.5, 0.5)
    background_color: tuple = BACKGROUND

    @classmethod
    def from_preprocessor_config(cls, d: dict, source: str = PREPROCESSOR_FILE) -> "Ocr2ImageProcessor":
        """The settings of a transformers DeepseekOcr2ImageProcessor's preprocessor_config.json dict (keys it
        leaves out keep transformers' defaults). ValueError naming a value seekmoe cannot follow."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a JSON object, found {type(d).__name__}")
        kind = d.get("image_processor_type", "DeepseekOcr2ImageProcessor")
        if kind not in ("DeepseekOcr2ImageProcessor", "DeepseekOcr2ImageProcessorPil"):
            raise ValueError(f"{source}: image_processor_type={kind!r}: expected 'DeepseekOcr2ImageProcessor'")
        for key, want in _FIXED:
            value = d.get(key, want)
            if isinstance(want, float):  # 1/255 as JSON writes it back
                differs = not isinstance(value, (int, float)) or isinstance(value, bool) or abs(value - want) > 1e-12
            else:
                differs = value is not want if isinstance(want, bool) else value != want
            if differs:
                raise ValueError(f"{source}: {key}={value!r}: expected {want!r} (the only preprocessing seekmoe "
                                 f"runs, transformers' default)")
        size = d.get("size", {"height": cls.image_size, "width": cls.image_size})
        if not isinstance(size, dict) or size.get("height") != size.get("width"):
            raise ValueError(f"{source}: size={size!r}: expected {{'height': N, 'width': N}} (square global views)")
        crop = d.get("crop_to_patches", True)
        if not isinstance(crop, bool):
            raise ValueError(f"{source}: crop_to_patches={crop!r}: expected true or false")
        low, high = d.get("min_patches", 2), d.get("max_patches", 6)
        if (not all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high))
                or not 1 <= low <= high <= 64):
            raise ValueError(f"{source}: min_patches={low!r}, max_patches={high!r}: expected integers with "
                             f"1 <= min_patches <= max_patches <= 64")
        return cls(image_size=_side(size.get("height"), "size.height", source),
                   tile_size=_side(d.get("tile_size", 768), "tile_size", source), min_patches=low,
                   max_patches=high, crop_to_patches=crop,
                   image_mean=_triple(d.get("image_mean", cls.image_mean), "image_mean", source, -1e3, 1e3),
                   image_std=_triple(d.get("image_std", cls.image_std), "image_std", source, 1e-6, 1e3),
                   background_color=tuple(int(v) for v in _triple(
                       d.get("background_color", list(BACKGROUND)), "background_color", source, 0, 255)))

    def to_preprocessor_config(self) -> dict:
        """The preprocessor_config.json dict transformers' AutoImageProcessor reads as these settings."""
        return {"image_processor_type": "DeepseekOcr2ImageProcessor", **dict(_FIXED),
                "size": {"height": self.image_size, "width": self.image_size}, "tile_size": self.tile_size,
                "crop_to_patches": self.crop_to_patches, "min_patches": self.min_patches,
                "max_patches": self.max_patches, "image_mean": list(self.image_mean),
                "image_std": list(self.image_std), "background_color": list(self.background_color)}

    def save(self, directory) -> None:
        """Write `directory/preprocessor_config.json`."""
        text = json.dumps(self.to_preprocessor_config(), indent=2, sort_keys=True) + "\n"
        (Path(directory) / PREPROCESSOR_FILE).write_text(text)

    def global_view(self, image: Image.Image) -> torch.Tensor:
        """[3, S, S]: the whole image, its longer side `image_size`, centred on grey."""
        side = self.image_size if self.crop_to_patches else self.tile_size
        width, height = image.size
        scale = side / max(width, height)
        resized = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BICUBIC)
        longest = max(resized.size)
        canvas = Image.new("RGB", (longest, longest), tuple(self.background_color))
        w, h = resized.size
        canvas.paste(resized, ((longest - w) // 2 if w < longest else 0, (longest - h) // 2 if h < longest else 0))
        return _normalized(canvas, self.image_mean, self.image_std)

    def crops(self, image: Image.Image) -> list[torch.Tensor]:
        """The local crops [3, tile, tile] in row-major order (none for an image within one tile)."""
        width, height = image.size
        if not self.crop_to_patches or max(width, height) <= self.tile_size:
            return []
        t = self.tile_size
        columns, rows = tile_grid(height, width, t, self.min_patches, self.max_patches)
        resized = image.resize((t * columns, t * rows), Image.BICUBIC)
        return [_normalized(resized.crop((c * t, r * t, (c + 1) * t, (r + 1) * t)), self.image_mean,
                            self.image_std) for r in range(rows) for c in range(columns)]

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


def default_processor(config) -> Ocr2ImageProcessor:
    """The preprocessing of an Ocr2Config's model without a preprocessor_config.json: global views of SAM's
    `image_size`, tiles 3/4 of it (the release's 1024 and 768; config.json does not say the tile size)."""
    size, patch = config.sam_config.image_size, config.sam_config.patch_size
    tile = max(patch, size * 3 // 4 // patch * patch)
    return Ocr2ImageProcessor(image_size=size, tile_size=tile)


def read_processor(directory, config) -> tuple[Ocr2ImageProcessor, str]:
    """(settings, a line saying where they came from) of a DeepSeek-OCR-2 folder: its preprocessor_config.json
    when present, else `default_processor(config)`. ValueError naming a bad value in the file."""
    path = Path(directory) / PREPROCESSOR_FILE
    if not path.is_file():
        p = default_processor(config)
        return p, (f"{directory}: no {PREPROCESSOR_FILE}: default DeepSeek-OCR-2 preprocessing (global views "
                   f"{p.image_size}px, tiles {p.tile_size}px, {p.min_patches}-{p.max_patches} crops, mean/std 0.5)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    p = Ocr2ImageProcessor.from_preprocessor_config(raw, str(path))
    return p, (f"{path}: DeepSeek-OCR-2 preprocessing: global views {p.image_size}px, tiles {p.tile_size}px, "
               f"{p.min_patches}-{p.max_patches} crops")


class PackedViews:
    """An Ocr2ImageProcessor giving the model's packed inputs: `processor(images)` -> (pixel_values, image_grid_thw)
    as `pack_views` makes them (flat pixels, one layout row per image), which Ocr2Model's forward and image_features
    take and which concatenate over images; `placeholders(row)` is one image's placeholder count. The same interface
    as Kimi-K2.5's vision/preprocess.ImageProcessor, so prompts, chats and analysis treat both models alike."""

    def __init__(self, settings: Ocr2ImageProcessor, config):
        self.settings, self.config = settings, config

    def __call__(self, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        from .ocr2_model import pack_views

        inputs = self.settings(images)
        return pack_views(inputs["pixel_values"], inputs.get("pixel_values_local"), inputs["num_local_patches"])

    def placeholders(self, row) -> int:
        """Placeholder tokens of one image of layout row (local crops, global side, tile side)."""
        n, global_side, tile_side = (int(v) for v in row)
        return self.config.image_tokens(global_side, tile_side, n)
