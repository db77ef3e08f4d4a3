"""Configs of a vision-language model, named field for field as in transformers' Kimi-K2.5 `config.json`
(model_type `kimi_k25`): `VisionConfig` for the MoonViT tower (`vision_config`), `VisionLanguageConfig` for the
whole (the projector's fields, the placeholder token ids, and the language model's ModelConfig as `text_config`).

Who reads it: vision/tower.py and vision/model.py build from it, vision/checkpoint.py reads and writes it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..config import ModelConfig

# Bounds far past every published tower (Kimi-K2.5's MoonViT: 27 layers, hidden 1152, a 64x64 position grid) that
# keep a hostile config.json from allocating anything large.
VISION_BOUNDS = {"num_hidden_layers": 256, "hidden_size": 1 << 14, "intermediate_size": 1 << 16,
                 "num_attention_heads": 1024, "patch_size": 1024, "pos_emb_height": 4096, "pos_emb_width": 4096,
                 "pos_emb_time": 4096}

# Fresh towers that `seekmoe sft --vision-tower tiny|small` attaches to a text model (patch 14 and a 2x2 merge as
# Kimi-K2.5; `small` is a few million parameters, `tiny` trains in seconds on a CPU).
VISION_PRESETS = {
    "tiny": dict(patch_size=14, pos_emb_height=16, pos_emb_width=16, num_attention_heads=2, num_hidden_layers=2,
                 hidden_size=32, intermediate_size=64),
    "small": dict(patch_size=14, pos_emb_height=32, pos_emb_width=32, num_attention_heads=6, num_hidden_layers=6,
                  hidden_size=384, intermediate_size=1536),
}

_VISION_DERIVED = {"model_type", "transformers_version", "dtype", "torch_dtype", "architectures"}
_TOP_DERIVED = {"model_type", "transformers_version", "dtype", "torch_dtype", "architectures", "auto_map",
                "text_config", "vision_config"}


def text_config_dict(raw: dict, source: str) -> dict:
    """The language model's config.json dict inside a `kimi_k25` config.json `raw`: its `text_config`, with the
    top-level word-embedding tying (transformers ties by the outer config, default True) and `kimi_k2` read as
    `deepseek_v3` (what it is)."""
    text = raw.get("text_config")
    if not isinstance(text, dict):
        raise ValueError(f"{source}: a kimi_k25 config.json needs a text_config object (the language model's "
                         f"config), found {type(text).__name__}")
    text = dict(text)
    if text.get("model_type", "deepseek_v3") == "kimi_k2":
        text["model_type"] = "deepseek_v3"
    text.setdefault("model_type", "deepseek_v3")
    text["tie_word_embeddings"] = bool(raw.get("tie_word_embeddings", True))
    return text


@dataclass
class VisionConfig:
    """MoonViT, the vision tower of Kimi-K2.5: patch embedding plus a learned position grid resampled to each image,
    `num_hidden_layers` pre-norm blocks with 2-D rotary attention, and a `merge_kernel_size` patch merger."""

    patch_size: int = 14
    pos_emb_height: int = 64
    pos_emb_width: int = 64
    pos_emb_time: int = 4
    num_attention_heads: int = 16
    num_hidden_layers: int = 27
    hidden_size: int = 1152
    intermediate_size: int = 4304
    hidden_act: str = "gelu_pytorch_tanh"
    merge_kernel_size: tuple[int, int] = (2, 2)
    rope_theta: float = 10000.0
    extra: dict = field(default_factory=dict, repr=False)  # unknown keys, written back unchanged

    def __post_init__(self) -> None:
        kernel = self.merge_kernel_size
        if not isinstance(kernel, (list, tuple)) or not all(isinstance(k, int) for k in kernel):
            raise ValueError(f"vision_config.merge_kernel_size={kernel!r}: expected two positive integers")
        self.merge_kernel_size = tuple(kernel)
        if not isinstance(self.rope_theta, (int, float)) or self.rope_theta <= 0:
            raise ValueError(f"vision_config rope_theta={self.rope_theta!r}: expected a positive number")
        for name, limit in VISION_BOUNDS.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
                raise ValueError(f"vision_config.{name}={value!r}: expected an integer in [1, {limit}]")
        if len(self.merge_kernel_size) != 2 or min(self.merge_kernel_size) < 1:
            raise ValueError(f"vision_config.merge_kernel_size={list(self.merge_kernel_size)}: expected two "
                             f"positive integers [height, width]")
        head_dim, rem = divmod(self.hidden_size, self.num_attention_heads)
        if rem or head_dim % 4:
            raise ValueError(f"vision_config.hidden_size={self.hidden_size} over num_attention_heads="
                             f"{self.num_attention_heads}: expected a head size divisible by 4 (2-D rotary "
                             f"embeddings rotate pairs along both axes)")
        if self.hidden_act != "gelu_pytorch_tanh":
            raise ValueError(f"vision_config.hidden_act={self.hidden_act!r}: expected 'gelu_pytorch_tanh'")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def preset(cls, name: str) -> "VisionConfig":
        """A fresh tower's shape by name (VISION_PRESETS)."""
        if name not in VISION_PRESETS:
            raise ValueError(f"unknown vision tower {name!r}: expected one of {sorted(VISION_PRESETS)} or a folder")
        return cls(**VISION_PRESETS[name])

    @classmethod
    def from_dict(cls, d: dict) -> "VisionConfig":
        """Read a `vision_config` dict as transformers writes it."""
        if not isinstance(d, dict):
            raise ValueError(f"vision_config is a {type(d).__name__}: expected an object")
        d = dict(d)
        rope = d.pop("rope_parameters", None) or {}
        kwargs: dict[str, Any] = {}
        if rope:
            if not isinstance(rope, dict) or rope.get("rope_type", "axial") != "axial":
                raise ValueError(f"vision_config.rope_parameters={str(rope)[:80]}: expected {{'rope_type': "
                                 f"'axial', 'rope_theta': ...}}")
            kwargs["rope_theta"] = rope.get("rope_theta", 10000.0)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra", "rope_theta"}
        extra = {}
        for k, v in d.items():
            if k in known:
                kwargs[k] = v
            elif k not in _VISION_DERIVED:
                extra[k] = v
        return cls(**kwargs, extra=extra)

    def to_dict(self) -> dict:
        """The `vision_config` dict transformers' Kimi_K25VisionConfig reads."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("extra", "rope_theta")}
        d["merge_kernel_size"] = list(self.merge_kernel_size)
        d["rope_parameters"] = {"rope_type": "axial", "rope_theta": self.rope_theta}
        d["model_type"] = "kimi_k25_vision"
        return {**self.extra, **d}


class TextConfigView:
    """What a vision-language config reads through from its language model's (`text_config`), under the names a
    text model's config gives them, where code written for text models reads them (tokenizer, engine, analyze);
    `media_placeholder_token_id` is its `image_token_id` (Kimi-K2.5's remote-code name for it)."""

    text_config: ModelConfig
    image_token_id: int

    @property
    def media_placeholder_token_id(self) -> int:
        return self.image_token_id

    @property
    def tie_word_embeddings(self) -> bool:
        return self.text_config.tie_word_embeddings

    @property
    def bos_token_id(self) -> int | None:
        return self.text_config.bos_token_id

    @property
    def eos_token_id(self) -> int | None:
        return self.text_config.eos_token_id

    @property
    def max_position_embeddings(self) -> int:
        return self.text_config.max_position_embeddings


@dataclass
class VisionLanguageConfig(TextConfigView):
    """A Kimi-K2.5-style vision-language model: MoonViT (`vision_config`), a projector from merged patches to the
    language model's width, and a DeepSeek-MoE language model (`text_config`). Image features take the place of the
    `image_token_id` placeholder tokens (Kimi-K2.5's remote code calls it `media_placeholder_token_id`)."""

    text_config: ModelConfig
    vision_config: VisionConfig
    projection_hidden_size: int | None = None  # the projector's LayerNorm width: the tower's hidden size
    projection_layer_norm_eps: float = 1e-5
    # seekmoe's own fresh towers only (Kimi-K2.5 has none, and its folders are written without the key): an RMSNorm
    # at the projector's end whose gain starts at the text embeddings' RMS, so image tokens enter the language model
    # at its embeddings' scale however the projector trains (without it, in `make demo-vision`, they grew to ~100x
    # the text embeddings and the language model learned to ignore them). transformers does not know the field.
    projection_output_norm: bool = False
    image_token_id: int = 163605
    video_token_id: int = 163840
    vision_start_token_id: int = 163602
    vision_end_token_id: int = 163604
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.projection_hidden_size is None:
            self.projection_hidden_size = self.vision_config.hidden_size
        if self.projection_hidden_size != self.vision_config.hidden_size:
            raise ValueError(f"projection_hidden_size={self.projection_hidden_size}: expected the vision tower's "
                             f"hidden_size {self.vision_config.hidden_size} (the projector normalizes its patches)")
        if not isinstance(self.image_token_id, int) or self.image_token_id < 0:
            raise ValueError(f"image_token_id={self.image_token_id!r}: expected a token id (a non-negative integer)")
        if not isinstance(self.projection_output_norm, bool):
            raise ValueError(f"projection_output_norm={self.projection_output_norm!r}: expected true or false")
        eps = self.projection_layer_norm_eps
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < 1:
            raise ValueError(f"projection_layer_norm_eps={eps!r}: expected a small positive number")

    @property
    def model_type(self) -> str:
        return "kimi_k25"

    @property
    def merged_patches(self) -> int:
        """Patches merged into one language-model token (2x2 = 4 for Kimi-K2.5)."""
        kh, kw = self.vision_config.merge_kernel_size
        return kh * kw

    def image_processor(self):
        """Pillow images -> (pixel_values, image_grid_thw) as the model takes them, with `placeholders(grid)`
        (vision/preprocess.ImageProcessor; DeepSeek-OCR-2's Ocr2Config.image_processor is the same interface)."""
        from .preprocess import ImageProcessor

        kernel = self.vision_config.merge_kernel_size
        if kernel[0] != kernel[1]:
            raise ValueError(f"merge_kernel_size {list(kernel)}: the image processor merges square blocks")
        return ImageProcessor(patch_size=self.vision_config.patch_size, merge_size=kernel[0])

    @classmethod
    def from_dict(cls, d: dict, text_config: ModelConfig) -> "VisionLanguageConfig":
        """Read a `kimi_k25` config.json dict; `text_config` is its `text_config` already read (and bounded)."""
        d = dict(d)
        vision = VisionConfig.from_dict(d.get("vision_config") or {})
        if "image_token_id" not in d and "media_placeholder_token_id" in d:
            d["image_token_id"] = d.pop("media_placeholder_token_id")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra", "text_config", "vision_config"}
        kwargs = {k: v for k, v in d.items() if k in known}
        extra = {k: v for k, v in d.items() if k not in known and k not in _TOP_DERIVED
                 and k != "tie_word_embeddings"}
        return cls(text_config=text_config, vision_config=vision, **kwargs, extra=extra)

    def save(self, directory) -> None:
        """Write `directory/config.json`."""
        import json
        from pathlib import Path

        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "config.json").write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    def to_dict(self) -> dict:
        """A config.json dict that transformers' AutoConfig reads as Kimi_K25Config."""
        text = self.text_config.to_dict()  # a deepseek_v3 model as in Kimi-K2.5 (or v2, or seekmoe's own router)
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name not in ("extra", "text_config", "vision_config")}
        if not self.projection_output_norm:  # Kimi-K2.5's config.json as released: no key it does not know
            del d["projection_output_norm"]
        return {**self.extra, **d, "model_type": "kimi_k25", "architectures": ["Kimi_K25ForConditionalGeneration"],
                "tie_word_embeddings": self.text_config.tie_word_embeddings, "text_config": text,
                "vision_config": self.vision_config.to_dict()}
