"""seekmoe: DeepSeek-style Mixture-of-Experts language models in plain PyTorch."""

from .config import PRESETS, ModelConfig
from .model import CausalLM, CausalLMOutput


def build_model(config: ModelConfig, device=None, dtype=None) -> CausalLM:
    """A freshly initialized CausalLM for `config` (on the meta device: shapes only, nothing allocated)."""
    import torch

    with torch.device(device or "cpu"):
        model = CausalLM(config)
    return model if dtype is None else model.to(dtype)


def from_pretrained(path, dtype=None, device=None, mmap=False) -> CausalLM:
    """Load a Hugging Face-layout DeepSeek-V2/V3 checkpoint directory (ours or DeepSeek's); `mmap=True` leaves the
    weights in their files, paged in when used ("auto": when they do not fit in memory)."""
    from .checkpoint import from_pretrained as _load

    return _load(path, dtype=dtype, device=device, mmap=mmap)


__all__ = ["ModelConfig", "PRESETS", "CausalLM", "CausalLMOutput", "build_model", "from_pretrained"]
__version__ = "0.1.0"
