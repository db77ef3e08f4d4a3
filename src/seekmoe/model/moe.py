"""The DeepSeekMoE layer: router + fine-grained routed experts + always-on shared experts, and its balance losses.

Balance statistics follow DeepSeek-V3's eq. 17-20 and DeepSeekMoE's expert- and device-level losses: the counts f_i
come from the plain top-k of the *unbiased* affinities over all routed experts (not from the selection the bias and
the group limit made, which the auxiliary-loss-free rule balances on its own), the P_i from the normalized
affinities. The sequence-wise loss and the z-loss are local to a forward; the batch-wise (expert- and device-level)
losses are computed by `batch_balance_loss` from every layer's `MoEStats`, over this forward's tokens or, with a
`BalanceWindow`, over every micro-batch of the optimizer step and every data-parallel rank.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import ModelConfig
from .dispatch import LocalDispatcher
from .experts import RoutedExperts
from .mlp import MLP
from .routing import RouterOutput, build_router, limit_capacity


@dataclass
class MoEStats:
    """What a trainer needs from one MoE layer's forward."""

    expert_counts: torch.Tensor  # [E] long, no grad: tokens routed to each expert (the real, biased selection)
    balance_loss: torch.Tensor  # scalar: the sequence-wise balance loss and z-loss, already weighted
    topk_counts: torch.Tensor | None = None  # [E] fp32, no grad: tokens whose plain top-k of unbiased scores has i
    score_mean: torch.Tensor | None = None  # [E] fp32: P_i, mean normalized affinity (carries the gradient)
    device_groups: int = 1  # groups of experts the device-level loss balances (a group = a device)
    dropped_slots: torch.Tensor | None = None  # [] long: slots dropped by the capacity limit (None = dropless)


class MoE(nn.Module):
    """y = sum_{i in top-k} g_i * Expert_i(x) + sum_j Shared_j(x)."""

    def __init__(self, config: ModelConfig, layer_idx: int | None = None):
        super().__init__()
        self.config = config
        # DeepSeek's router, or one of the MoE literature's (model/routing/) when config.router_type says so;
        # DeepSeek-V4's hash layers (by `layer_idx`) route by a token table.
        self.gate = build_router(config, layer_idx)
        self.dispatcher = LocalDispatcher(config.n_routed_experts)
        limit = config.swiglu_limit
        self.experts = RoutedExperts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size,
                                     swiglu_limit=limit)
        self.shared_experts = (MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts, limit)
                               if config.n_shared_experts > 0 else None)
        # Experts are grouped into "devices" for the device-level loss: the router's groups on one process;
        # parallel/ sets the expert-parallel size here when the experts really are spread over several ranks.
        self.device_groups = config.n_group

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, MoEStats]:
        """x [B, S, hidden] -> (y [B, S, hidden], stats); token_ids [B, S] are read by hash routing only."""
        B, S, H = x.shape
        flat = x.reshape(-1, H)
        # fp32 whatever the autocast state; replay and probes act through the router's hook
        route = self.gate(flat, None if token_ids is None else token_ids.reshape(-1))
        capacity = self.config.train_capacity() if self.training else self.config.eval_capacity()
        routed_counts = dropped = None
        if capacity > 0:
            route, routed_counts, dropped = limit_capacity(route, capacity, self.config.n_routed_experts)
        rows, row_weights, plan = self.dispatcher.dispatch(flat, route.indices, route.weights)
        y = self.dispatcher.combine(self.experts(rows, row_weights, plan), plan).to(x.dtype).view(B, S, H)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        stats = MoEStats(plan.routed_counts if routed_counts is None else routed_counts, route.logits.new_zeros(()),
                         device_groups=self.device_groups, dropped_slots=dropped)
        # Balance losses shape training only; evaluation and inference skip them.
        if self.training and self.gate.uses_balance_losses and _any_balance_loss(self.config):
            with torch.autocast(x.device.type, enabled=False):
                stats.balance_loss, stats.topk_counts, stats.score_mean = _local_balance(route, self.config, B, S)
        if route.aux_loss is not None:  # the router's own balance loss (the literature routers')
            stats.balance_loss = route.aux_loss
        return y, stats


def _any_balance_loss(config: ModelConfig) -> bool:
    return bool(config.aux_loss_alpha or config.expert_balance_alpha or config.device_balance_alpha
                or config.router_z_loss_coef)


def _local_balance(route: RouterOutput, config: ModelConfig, batch: int,
                   seq: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sequence-wise loss + z-loss, plain-top-k counts [E], mean normalized affinities P [E]) of one forward.

    Sequence-wise (DeepSeek-V3 eq. 17-20, alpha = aux_loss_alpha): per sequence, sum_i f_i P_i with
    f_i = E/(K*S) * #{t : i in TopK(s_t, K)} and P_i the mean of s_{i,t} / sum_j s_{j,t}, averaged over sequences.
    Router z-loss (router_z_loss_coef): mean of logsumexp(logits)^2.
    """
    E, K = config.n_routed_experts, config.num_experts_per_tok
    scores = route.scores.float()
    normalized = scores / scores.sum(dim=-1, keepdim=True)  # [T, E] s'_{i,t}
    with torch.no_grad():
        topk = scores.topk(K, dim=-1).indices  # [T, K] plain top-k of the unbiased affinities, no group limit
        hits = torch.zeros_like(scores).scatter_(1, topk, 1.0)  # [T, E]
    loss = scores.new_zeros(())
    if config.aux_loss_alpha > 0:
        f = hits.view(batch, seq, E).mean(dim=1) * (E / K)  # [B, E]
        p = normalized.view(batch, seq, E).mean(dim=1)
        loss = loss + config.aux_loss_alpha * (f * p).sum(dim=-1).mean()
    if config.router_z_loss_coef > 0:
        loss = loss + config.router_z_loss_coef * torch.logsumexp(route.logits.float(), dim=-1).pow(2).mean()
    return loss, hits.sum(dim=0), normalized.mean(dim=0)


@dataclass
class BalanceWindow:
    """The batch over which the expert- and device-level losses count f_i (`balance_scope=global`): every
    micro-batch of the current optimizer step so far, summed over data-parallel ranks by `reduce` (parallel/ gives
    an all-reduce; None = this process only). As in Megatron-Core's global auxiliary loss, micro-batch m uses the
    counts of micro-batches 1..m; `reset()` starts the next step. Only counts are accumulated: they carry no
    gradient, so each micro-batch's backward stays its own."""

    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    counts: torch.Tensor | None = field(default=None, repr=False)  # [n MoE layers, E] plain-top-k counts so far
    tokens: torch.Tensor | None = field(default=None, repr=False)  # [] tokens so far

    def reset(self) -> None:
        """Forget the counts of the previous optimizer step."""
        self.counts = self.tokens = None

    def add(self, counts: torch.Tensor, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Add one micro-batch's counts [layers, E] over `tokens` tokens; return the window's (counts, tokens)."""
        packed = torch.cat([counts.reshape(-1), counts.new_full((1,), float(tokens))])
        if self.reduce is not None:
            packed = self.reduce(packed)
        counts, tokens_t = packed[:-1].view_as(counts), packed[-1]
        self.counts = counts if self.counts is None else self.counts + counts
        self.tokens = tokens_t if self.tokens is None else self.tokens + tokens_t
        return self.counts, self.tokens


def device_groups_for(config: ModelConfig, groups: int) -> int:
    """Check that the device-level loss has devices to balance: `groups` (> 1) groups of experts, else ValueError."""
    if config.device_balance_alpha > 0 and groups <= 1:
        raise ValueError(f"device_balance_alpha={config.device_balance_alpha} needs experts spread over several "
                         f"devices, but there is one group (n_group={config.n_group}, no expert parallelism): set "
                         f"n_group > 1 (or train with parallel.ep > 1), or device_balance_alpha=0")
    if config.n_routed_experts % max(groups, 1):
        raise ValueError(f"n_routed_experts={config.n_routed_experts} cannot be split into {groups} device groups")
    return groups


def batch_balance_loss(stats: list[MoEStats], config: ModelConfig, tokens: int,
                       window: BalanceWindow | None = None) -> torch.Tensor | None:
    """DeepSeekMoE's expert-level (expert_balance_alpha) and device-level (device_balance_alpha) balance losses,
    summed over layers, from each layer's plain-top-k counts and P_i over `tokens` tokens of this forward.

    f_i = E/(K*T) * count_i over this forward (window None) or over the window; P_i over this forward's tokens.
    Device level: f'_d = mean of f_i over device d's experts, P'_d = sum of P_i over them.
    """
    if not (config.expert_balance_alpha or config.device_balance_alpha):
        return None
    stats = [s for s in stats if s.topk_counts is not None]
    if not stats:
        return None
    E, K = config.n_routed_experts, config.num_experts_per_tok
    with torch.autocast(stats[0].score_mean.device.type, enabled=False):
        counts = torch.stack([s.topk_counts for s in stats])  # [layers, E]
        total = counts.new_full((), float(tokens))
        if window is not None:
            counts, total = window.add(counts, tokens)
        f = counts * (E / K) / total  # [layers, E]
        p = torch.stack([s.score_mean for s in stats])  # [layers, E]
        loss = p.new_zeros(())
        if config.expert_balance_alpha > 0:
            loss = loss + config.expert_balance_alpha * (f * p).sum()
        if config.device_balance_alpha > 0:
            groups = device_groups_for(config, stats[0].device_groups)
            f_dev = f.view(len(stats), groups, -1).mean(dim=-1)
            p_dev = p.view(len(stats), groups, -1).sum(dim=-1)
            loss = loss + config.device_balance_alpha * (f_dev * p_dev).sum()
    return loss
