"""AdamW (or Muon, muon.py) with DeepSeek-style parameter groups, and the learning-rate schedules (warmup + cosine,
warmup-stable-decay)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import TrainConfig


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (`optimizer=adamw`); norms, biases and embeddings get no weight decay
    unless `decay_norms_biases_embeddings`. Group 0 decays, group 1 does not. With `optimizer=muon`, the hidden
    weight matrices go to Muon instead (muon.py; groups 2 and 3: plain matrices, fused gate/up expert stacks)."""
    if config.optimizer == "muon":
        return _build_muon(model, config)
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


def muon_parameters(model: nn.Module) -> dict[str, torch.nn.Parameter]:
    """The trainable parameters Muon updates (by name): the hidden weight matrices (attention and MLP projections,
    expert stacks [E, out, in] as E matrices, MTP's eh_proj, V4's hyper-connection projections), not the
    embedding, output head, norms, biases or routers (Moonlight's split; a router's few rows are AdamW's, like a bias)."""
    from ..model.routing import Router

    excluded: set[int] = set()
    for module in model.modules():
        if isinstance(module, (Router, nn.Embedding)):
            excluded.update(id(p) for p in module.parameters())
    lm_head = getattr(model, "lm_head", None)
    if lm_head is not None:
        excluded.add(id(lm_head.weight))
    # a 2-D bias (V4's compressors' position_bias, added per window position) maps nothing: AdamW's, like a bias
    return {name: p for name, p in model.named_parameters()
            if p.requires_grad and p.ndim >= 2 and id(p) not in excluded and "bias" not in name.rsplit(".", 1)[-1]}


def _build_muon(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    from .muon import Muon

    muon = muon_parameters(model)
    fused = {n for n, p in muon.items() if n.endswith("gate_up_proj") and p.ndim == 3}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad and name not in muon:
            exempt = p.ndim < 2 or "embed_tokens" in name
            (no_decay if exempt and not config.decay_norms_biases_embeddings else decay).append(p)
    wd = config.weight_decay
    groups = [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0},
              {"params": [p for n, p in muon.items() if n not in fused], "weight_decay": wd, "muon": True},
              {"params": [p for n, p in muon.items() if n in fused], "weight_decay": wd, "muon": True, "halves": 2}]
    return Muon(groups, lr=config.lr, weight_decay=wd, momentum=config.muon_momentum,
                ns_steps=config.muon_ns_steps, betas=(config.beta1, config.beta2), eps=config.eps)


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
