"""Vision-language models: MoonViT (Kimi-K2.5's vision tower), its projector, image preprocessing, and the model
in which image features take the place of placeholder tokens in front of a DeepSeek-MoE CausalLM."""

from .config import VisionConfig, VisionLanguageConfig
from .model import VisionLanguageModel

__all__ = ["VisionConfig", "VisionLanguageConfig", "VisionLanguageModel"]
