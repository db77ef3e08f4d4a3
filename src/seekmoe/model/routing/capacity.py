"""Expert capacity: the token dropping of Switch and GShard, for every router including DeepSeek's.

Each expert takes at most ceil(capacity_factor * tokens * top_k / E) slots of the batch, first choices before second
ones, earlier tokens first; a dropped slot gets weight 0 (no output, no gradient) and its token passes through the
residual. The MoE layer applies it after routing when `capacity_factor` (training) or `eval_capacity_factor` is set.
"""

from __future__ import annotations

import math

import torch

from .interface import RouterOutput


def limit_capacity(route: RouterOutput, capacity_factor: float,
                   n_experts: int) -> tuple[RouterOutput, torch.Tensor, torch.Tensor]:
    """Drop the slots beyond each expert's capacity ceil(capacity_factor * T * top_k / E): (the route with those
    slots' weights zeroed and `kept` false, slots each expert was routed before dropping [E], dropped slots []).

    Slots are served in order of choice (every token's first expert before any second one, as in GShard), then of
    token; slots the router itself did not keep (`route.kept`) take no capacity. No host synchronization.
    """
    T, k = route.indices.shape
    capacity = math.ceil(capacity_factor * T * k / n_experts)
    used = (torch.ones_like(route.indices, dtype=torch.bool) if route.kept is None else route.kept).t().reshape(-1)
    expert = torch.where(used, route.indices.t().reshape(-1), n_experts)  # [k*T] choice-major; unused -> E
    order = expert.argsort(stable=True)
    # scatter_add, not bincount: bincount learns its output size from the data, a host synchronization on a GPU
    counts = torch.zeros(n_experts + 1, dtype=torch.long, device=expert.device).scatter_add_(
        0, expert, torch.ones_like(expert))  # [E + 1]
    starts = counts.cumsum(0) - counts
    rank = torch.empty_like(expert)
    rank[order] = torch.arange(expert.numel(), device=expert.device) - starts[expert[order]]
    keep = used & (rank < capacity)  # [k*T]
    kept = keep.view(k, T).t()  # [T, k]
    dropped = (used & ~keep).sum()
    out = RouterOutput(route.weights * kept, route.indices, route.scores, route.logits, kept, route.aux_loss)
    return out, counts[:n_experts], dropped
