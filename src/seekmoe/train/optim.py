"""AdamW with DeepSeek-style parameter groups, and the learning-rate schedules (warmup + cosine, warmup-stable-decay)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import TrainConfig


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; norms, biases and embeddings get no weight decay unless
    `decay_norms_biases_embeddings`. Group 0 decays, group 1 does not."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.ndim < 2 or "embed_tokens" in name
        (no_decay if exempt and not config.decay_norms_biases_embeddings else decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # foreach=False: the same arithmetic order on every run, so a resumed run repeats the uninterrupted one bit for bit.
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps,
                             foreach=False)


def lr_at(step: int, config: TrainConfig) -> float:
    """The learning rate of optimizer step `step` (0-based): linear warmup, then cosine decay to
    lr * min_lr_ratio at max_steps, or (wsd) constant until the last decay_fraction of steps and linear decay."""
    peak, floor = config.lr, config.lr * config.min_lr_ratio
    if step < config.warmup_steps:
        return peak * (step + 1) / config.warmup_steps
    if config.lr_schedule == "cosine":
        span = max(config.max_steps - config.warmup_steps, 1)
        progress = min((step - config.warmup_steps) / span, 1.0)
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_start = config.max_steps - int(config.decay_fraction * config.max_steps)
    if step < decay_start:
        return peak
    progress = min((step - decay_start) / max(config.max_steps - decay_start, 1), 1.0)
    return peak + (floor - peak) * progress
