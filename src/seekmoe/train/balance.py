"""Auxiliary-loss-free load balancing between optimizer steps, and DeepSeek-V3's MaxVio measure of imbalance."""

from __future__ import annotations

import torch
from torch import nn


def update_router_biases(moe_layers: list[nn.Module], expert_counts: torch.Tensor, speed: float) -> None:
    """Move each MoE layer's selection bias by speed * sign(mean load - load), from the tokens each expert got in
    the step just taken (expert_counts [n MoE layers, E], rows in `model.moe_layers()` order). No gradients.
    Routers without a selection bias (`uses_bias_balancing` false) are left alone."""
    if len(moe_layers) != expert_counts.shape[0]:
        raise ValueError(f"expert_counts has {expert_counts.shape[0]} rows for {len(moe_layers)} MoE layers")
    for moe, counts in zip(moe_layers, expert_counts):
        if moe.gate.uses_bias_balancing:
            moe.gate.update_bias(counts, speed)


def max_violation(expert_counts: torch.Tensor) -> torch.Tensor:
    """MaxVio per layer, (max_i load_i - mean load) / mean load, from expert_counts [layers, E] -> [layers]."""
    load = expert_counts.double()
    mean = load.mean(dim=-1).clamp_min(1e-12)
    return (load.amax(dim=-1) - mean) / mean
