"""ModelConfig: fields and derived sizes (fields.py), validation (validation.py), Hugging Face config.json
conversion (hf.py) and named presets (presets.py)."""

from .fields import ModelConfig, yarn_get_mscale
from .hf import ROPE_SCALING_KEYS
from .presets import PRESETS
from .validation import ROUTER_TYPES, SCORING_FUNCS, TOPK_METHODS

__all__ = ["ModelConfig", "PRESETS", "ROPE_SCALING_KEYS", "ROUTER_TYPES", "SCORING_FUNCS", "TOPK_METHODS",
           "yarn_get_mscale"]
