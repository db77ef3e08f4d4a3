"""Configs of DeepSeek-OCR-2 (transformers `deepseek_ocr2`), named field for field as in its config.json:
`SamConfig` (`vision_config.sam_config`: the SAM ViT-B image encoder, its neck and two downsampling convolutions),
`EncoderConfig` (`vision_config.encoder_config`: the Qwen2-style encoder that reads the SAM tokens through learned
queries), and `Ocr2Config` for the whole (the placeholder token id and the language model's ModelConfig, a
multi-head DeepSeek-V2 MoE, as `text_config`), with the folder's image preprocessing (`processor`, which
preprocessor_config.json holds: it is written beside config.json).

Who reads it: vision/ocr2_sam.py, vision/ocr2_encoder.py and vision/ocr2_model.py build from it;
vision/ocr2_checkpoint.py reads and writes it; what asks any vision-language model's config (prompts, the engine,
analyze) reads `text_config`, `image_token_id` and `image_processor()`, as of Kimi-K2.5's VisionLanguageConfig.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ModelConfig
from .config import TextConfigView

# Far past the release (SAM ViT-B: 12 layers, 768 wide; the encoder: Qwen2-0.5B's 24 layers, 896 wide), small enough
# that a hostile config.json cannot allocate anything large.
OCR2_BOUNDS = {"hidden_size": 1 << 14, "num_hidden_layers": 256, "num_attention_heads": 1024, "image_size": 8192,
               "patch_size": 1024, "output_channels": 1 << 14, "window_size": 1024, "mlp_dim": 1 << 16,
               "intermediate_size": 1 << 16, "num_key_value_heads": 1024, "num_channels": 16}
# Learned query counts of the encoder: 12x12 for views whose SAM grid has at most 144 cells (768-pixel tiles), 16x16
# otherwise (1024-pixel global views). transformers hard-codes both sizes whatever the config says.
QUERIES_768, QUERIES_1024 = 144, 256
_DERIVED = {"model_type", "transformers_version", "dtype", "torch_dtype", "architectures", "_name_or_path",
            "auto_map", "scale"}


def _bounded(section: str, obj) -> None:
    for name, limit in OCR2_BOUNDS.items():
        value = getattr(obj, name, None)
        if value is None:  # a field of the other section
            continue
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
            raise ValueError(f"{section}.{name}={value!r}: expected an integer in [1, {limit}]")


def _split(cls, d: dict) -> tuple[dict, dict]:
    known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    return ({k: v for k, v in d.items() if k in known},
            {k: v for k, v in d.items() if k not in known and k not in _DERIVED})


@dataclass
class SamConfig:
    """SAM ViT-B: `patch_size` patch embedding plus a learned position grid (resampled to each view), pre-norm
    blocks with decomposed relative positions (windowed, except `global_attn_indexes`), a neck to
    `output_channels`, then two stride-2 3x3 convolutions to `downsample_channels`."""

    hidden_size: int = 768
    output_channels: int = 256
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 1024
    patch_size: int = 16
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    initializer_range: float = 1e-10
    qkv_bias: bool = True
    mlp_ratio: float = 4.0
    use_abs_pos: bool = True
    use_rel_pos: bool = True
    window_size: int = 14
    global_attn_indexes: list = field(default_factory=lambda: [2, 5, 8, 11])
    mlp_dim: int | None = None
    downsample_channels: list = field(default_factory=lambda: [512, 896])
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.downsample_channels is None:
            self.downsample_channels = [512, 896]
        if self.mlp_dim is None:
            self.mlp_dim = int(self.hidden_size * self.mlp_ratio)
        _bounded("sam_config", self)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"sam_config.hidden_size={self.hidden_size}: expected a multiple of "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.hidden_act != "gelu":
            raise ValueError(f"sam_config.hidden_act={self.hidden_act!r}: expected 'gelu'")
        channels = self.downsample_channels
        if (not isinstance(channels, (list, tuple)) or len(channels) != 2
                or not all(isinstance(c, int) and 1 <= c <= 1 << 14 for c in channels)):
            raise ValueError(f"sam_config.downsample_channels={channels!r}: expected two positive integers")
        self.downsample_channels = list(channels)
        layers = self.global_attn_indexes
        if not isinstance(layers, (list, tuple)) or not all(isinstance(i, int) and 0 <= i for i in layers):
            raise ValueError(f"sam_config.global_attn_indexes={layers!r}: expected a list of layer indices")
        self.global_attn_indexes = list(layers)
        if self.image_size % self.patch_size:
            raise ValueError(f"sam_config.image_size={self.image_size}: expected a multiple of "
                             f"patch_size={self.patch_size}")

    @property
    def grid(self) -> int:
        """Patches a side of the learned position grid (and of the global-attention relative positions)."""
        return self.image_size // self.patch_size

    def window(self, layer: int) -> int:
        """The attention window of block `layer` (0: global attention over the whole view)."""
        return 0 if layer in self.global_attn_indexes else self.window_size

    @classmethod
    def from_dict(cls, d: dict) -> "SamConfig":
        kwargs, extra = _split(cls, d)
        return cls(**kwargs, extra=extra)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**self.extra, **d, "model_type": "deepseek_ocr2_sam_vision_model"}


@dataclass
class EncoderConfig:
    """The second encoder (Qwen2 decoder layers, no embedding table): SAM's tokens, then learned queries, with
    attention bidirectional among the image tokens and causal for the queries; the queries' outputs are the
    image's features."""

    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 32
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_parameters: dict | None = None
    use_sliding_window: bool = False
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        _bounded("encoder_config", self)
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"encoder_config: hidden_size={self.hidden_size}, num_attention_heads="
                             f"{self.num_attention_heads}, num_key_value_heads={self.num_key_value_heads}: expected "
                             f"heads dividing hidden_size and key/value heads dividing heads")
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError(f"encoder_config.hidden_size={self.hidden_size} over num_attention_heads="
                             f"{self.num_attention_heads}: expected an even head size (rotary pairs)")
        if self.hidden_act != "silu":
            raise ValueError(f"encoder_config.hidden_act={self.hidden_act!r}: expected 'silu'")
        if self.use_sliding_window:
            raise ValueError("encoder_config.use_sliding_window=true is not supported: expected false (as released)")
        rope = self.rope_parameters or {"rope_type": "default", "rope_theta": 10000.0}
        if not isinstance(rope, dict) or rope.get("rope_type", "default") != "default":
            raise ValueError(f"encoder_config.rope_parameters={rope!r}: expected rope_type 'default'")
        theta = rope.get("rope_theta", 10000.0)
        if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
            raise ValueError(f"encoder_config.rope_parameters.rope_theta={theta!r}: expected a positive number")
        self.rope_parameters = {**rope, "rope_type": "default", "rope_theta": float(theta)}

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rope_theta(self) -> float:
        return self.rope_parameters["rope_theta"]

    @classmethod
    def from_dict(cls, d: dict) -> "EncoderConfig":
        d = dict(d)
        if "rope_parameters" not in d and "rope_theta" in d:  # transformers 4.x spelling
            d["rope_parameters"] = {"rope_type": "default", "rope_theta": d.pop("rope_theta")}
        kwargs, extra = _split(cls, d)
        for derived in ("layer_types", "sliding_window", "max_window_layers"):  # follow from use_sliding_window
            extra.pop(derived, None)
        return cls(**kwargs, extra=extra)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**self.extra, **d, "model_type": "deepseek_ocr2_encoder"}


@dataclass
class Ocr2Config(TextConfigView):
    """DeepSeek-OCR-2: SamConfig + EncoderConfig in front of a multi-head DeepSeek-V2 MoE (`text_config`);
    `image_token_id` is the placeholder each image feature replaces."""

    text_config: ModelConfig
    sam_config: SamConfig
    encoder_config: EncoderConfig
    image_token_id: int = 128815
    extra: dict = field(default_factory=dict, repr=False)
    vision_extra: dict = field(default_factory=dict, repr=False)
    # an ocr2_preprocess.Ocr2ImageProcessor: the folder's preprocessor_config.json (None: ocr2_preprocess's defaults)
    processor: object = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.image_token_id, int) or isinstance(self.image_token_id, bool) \
                or self.image_token_id < 0:
            raise ValueError(f"image_token_id={self.image_token_id!r}: expected a token id (a non-negative integer)")
        if self.sam_config.downsample_channels[1] != self.encoder_config.hidden_size:
            raise ValueError(f"vision_config.sam_config.downsample_channels[1]={self.sam_config.downsample_channels[1]}"
                             f": expected encoder_config.hidden_size={self.encoder_config.hidden_size} (the SAM "
                             f"tokens enter the encoder beside its queries)")
        if self.text_config.use_mla:
            raise ValueError("text_config: DeepSeek-OCR-2's language model has multi-head attention: expected "
                             "use_mla false (model_type deepseek_ocr2_text)")

    @property
    def model_type(self) -> str:
        return "deepseek_ocr2"

    def preprocessing(self):
        """The Ocr2ImageProcessor settings of this model: `processor`, else the defaults config.json implies."""
        from .ocr2_preprocess import default_processor

        return self.processor if self.processor is not None else default_processor(self)

    def image_processor(self):
        """Pillow images -> (pixel_values, image_grid_thw) as the model takes them, with `placeholders(row)`
        (ocr2_preprocess.PackedViews; Kimi-K2.5's VisionLanguageConfig.image_processor is the same interface)."""
        from .ocr2_preprocess import PackedViews

        return PackedViews(self.preprocessing(), self)

    def view_tokens(self, side: int) -> int:
        """Image features of one square view of `side` pixels: the encoder's learned queries, 144 for a SAM grid
        (after the two stride-2 convolutions) of at most 144 cells, else 256."""
        grid = side // self.sam_config.patch_size
        for _ in range(2):
            grid = (grid + 1) // 2  # 3x3 convolution, stride 2, padding 1
        return QUERIES_768 if grid * grid <= QUERIES_768 else QUERIES_1024

    def image_tokens(self, global_side: int, tile_side: int, n_local: int) -> int:
        """Placeholders of one image: its local crops' features, the global view's, and the view separator."""
        return n_local * self.view_tokens(tile_side) + self.view_tokens(global_side) + 1

    @classmethod
    def from_dict(cls, d: dict, text_config: ModelConfig) -> "Ocr2Config":
        """Read a `deepseek_ocr2` config.json dict; `text_config` is its `text_config` already read (and bounded)."""
        vision = d.get("vision_config") or {}
        if not isinstance(vision, dict):
            raise ValueError(f"vision_config: expected an object, found {type(vision).__name__}")
        for key in ("sam_config", "encoder_config"):
            if not isinstance(vision.get(key) or {}, dict):
                raise ValueError(f"vision_config.{key}: expected an object, found {type(vision[key]).__name__}")
        sam = SamConfig.from_dict(vision.get("sam_config") or {})
        encoder = EncoderConfig.from_dict(vision.get("encoder_config") or {})
        vision_extra = {k: v for k, v in vision.items() if k not in {"sam_config", "encoder_config"} | _DERIVED}
        extra = {k: v for k, v in d.items() if k not in {"text_config", "vision_config", "image_token_id",
                                                         "tie_word_embeddings"} | _DERIVED}
        return cls(text_config=text_config, sam_config=sam, encoder_config=encoder,
                   image_token_id=d.get("image_token_id", 128815), extra=extra, vision_extra=vision_extra)

    def to_dict(self) -> dict:
        """A config.json dict that transformers' AutoConfig reads as DeepseekOcr2Config."""
        vision = {**self.vision_extra, "model_type": "deepseek_ocr2_vision", "sam_config": self.sam_config.to_dict(),
                  "encoder_config": self.encoder_config.to_dict()}
        return {**self.extra, "model_type": "deepseek_ocr2", "architectures": ["DeepseekOcr2ForConditionalGeneration"],
                "image_token_id": self.image_token_id, "tie_word_embeddings": self.text_config.tie_word_embeddings,
                "text_config": self.text_config.to_dict(), "vision_config": vision}

    def save(self, directory) -> None:
        """Write `directory/config.json` and `directory/preprocessor_config.json` (the image preprocessing, which
        transformers' AutoImageProcessor loads)."""
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "config.json").write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        self.preprocessing().save(directory)


def ocr2_text_config_dict(raw: dict, source: str) -> dict:
    """The language model's config.json dict inside a `deepseek_ocr2` config.json `raw` (its `text_config`, with
    the top-level word-embedding tying: transformers ties by the outer config, default False)."""
    text = raw.get("text_config")
    if not isinstance(text, dict):
        raise ValueError(f"{source}: a deepseek_ocr2 config.json needs a text_config object (the language model's "
                         f"config), found {type(text).__name__}")
    text = dict(text)
    text.setdefault("model_type", "deepseek_ocr2_text")
    text["tie_word_embeddings"] = bool(raw.get("tie_word_embeddings", False))
    return text
