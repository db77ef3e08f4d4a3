"""Vision-language models: MoonViT (Kimi-K2.5's vision tower), its projector, image preprocessing, and the model
in which image features take the place of placeholder tokens in front of a DeepSeek-MoE CausalLM; and
DeepSeek-OCR-2 (SAM and the query encoder in front of a multi-head DeepSeek-V2 MoE)."""

from .config import VisionConfig, VisionLanguageConfig
from .model import VisionLanguageModel
from .ocr2_config import Ocr2Config
from .ocr2_model import Ocr2Model

__all__ = ["VisionConfig", "VisionLanguageConfig", "VisionLanguageModel", "Ocr2Config", "Ocr2Model"]
