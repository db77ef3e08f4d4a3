"""The DeepSeek-MoE model, one concept a module."""

from .transformer import CausalLM, CausalLMOutput

__all__ = ["CausalLM", "CausalLMOutput"]
