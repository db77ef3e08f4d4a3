"""The DeepSeekMoE layer: router + fine-grained routed experts + always-on shared experts, and its balance losses."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig
from .dispatch import LocalDispatcher
from .experts import RoutedExperts
from .mlp import MLP
from .router import Router, RouterOutput


@dataclass
class MoEStats:
    """What a trainer needs from one MoE layer's forward."""

    expert_counts: torch.Tensor  # [E] tokens routed to each expert (long, no grad)
    balance_loss: torch.Tensor  # scalar: the configured balance losses and z-loss, already weighted


class MoE(nn.Module):
    """y = sum_{i in top-k} g_i * Expert_i(x) + sum_j Shared_j(x)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.gate = Router(config)
        self.dispatcher = LocalDispatcher(config.n_routed_experts)
        self.experts = RoutedExperts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_experts = (MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
                               if config.n_shared_experts > 0 else None)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        """x [B, S, hidden] -> (y [B, S, hidden], stats)."""
        B, S, H = x.shape
        flat = x.reshape(-1, H)
        route = self.gate(flat)
        rows, row_weights, plan = self.dispatcher.dispatch(flat, route.indices, route.weights)
        y = self.dispatcher.combine(self.experts(rows, row_weights, plan), plan).to(x.dtype).view(B, S, H)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        # Balance losses shape training only; evaluation and inference skip them.
        loss = balance_loss(route, self.config, B, S) if self.training else route.logits.new_zeros(())
        return y, MoEStats(plan.routed_counts, loss)


def balance_loss(route: RouterOutput, config: ModelConfig, batch: int, seq: int) -> torch.Tensor:
    """Weighted sum of the enabled balance losses for one layer.

    - sequence-wise (DeepSeek-V3, alpha = aux_loss_alpha): per sequence, E/(K*S) * sum_i f_i * P_i with P_i the
      mean of the per-token normalized affinities;
    - expert-level (DeepSeekMoE, expert_balance_alpha): the same over the whole batch;
    - device-level (DeepSeekMoE, device_balance_alpha): over groups of experts (a group = a device);
    - router z-loss (router_z_loss_coef): mean of logsumexp(logits)^2.
    """
    total = route.logits.new_zeros(())
    if not (config.aux_loss_alpha or config.expert_balance_alpha or config.device_balance_alpha
            or config.router_z_loss_coef):
        return total
    E, K = config.n_routed_experts, config.num_experts_per_tok
    scores = route.scores / route.scores.sum(dim=-1, keepdim=True)  # [T, E] normalized affinities
    chosen = torch.zeros_like(scores).scatter_(1, route.indices, 1.0)  # [T, E] 1 where routed
    if config.aux_loss_alpha > 0:
        f = chosen.view(batch, seq, E).mean(dim=1) * (E / K)  # [B, E]
        p = scores.view(batch, seq, E).mean(dim=1)
        total = total + config.aux_loss_alpha * (f * p).sum(dim=-1).mean()
    if config.expert_balance_alpha > 0 or config.device_balance_alpha > 0:
        f = chosen.mean(dim=0) * (E / K)  # [E]
        p = scores.mean(dim=0)
        if config.expert_balance_alpha > 0:
            total = total + config.expert_balance_alpha * (f * p).sum()
        if config.device_balance_alpha > 0:
            f_dev = f.view(config.n_group, -1).mean(dim=-1)
            p_dev = p.view(config.n_group, -1).sum(dim=-1)
            total = total + config.device_balance_alpha * (f_dev * p_dev).sum()
    if config.router_z_loss_coef > 0:
        total = total + config.router_z_loss_coef * torch.logsumexp(route.logits, dim=-1).pow(2).mean()
    return total
