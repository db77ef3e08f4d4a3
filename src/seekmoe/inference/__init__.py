"""Inference: MLA's latent cache, sampling, a continuously batched engine, and MTP speculative decoding."""

from .cache import LatentCache
from .engine import Engine, Request
from .sampling import SamplingParams

__all__ = ["Engine", "LatentCache", "Request", "SamplingParams"]
