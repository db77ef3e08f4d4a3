"""Inference: MLA's latent cache, sampling, a continuously batched engine, and MTP speculative decoding."""

from .cache import DecodeCache, LatentCache
from .engine import Engine, Request
from .sampling import SamplingParams

__all__ = ["DecodeCache", "Engine", "LatentCache", "Request", "SamplingParams"]
