"""Token dispatch for the routed experts: group every token's top-k slots by expert, then sum them back per token.

`dispatch` and `combine` are the only places that know where tokens live. Here they permute rows on one device;
expert parallelism replaces them with an all-to-all that sends each group to the rank holding its expert, while the
router before them and the expert math between them stay unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DispatchPlan:
    """Where each token slot went, so that `combine` can bring the experts' outputs back to their tokens."""

    token: torch.Tensor  # [T * top_k] source token of each slot, slots grouped by expert (expert 0 first)
    expert: torch.Tensor  # [T * top_k] expert of each slot, in the same grouped order (non-decreasing)
    counts: torch.Tensor  # [E_local] long: rows each expert here received (= tokens: a token picks an expert once)
    offsets: torch.Tensor  # [E_local] int32: cumulative row ends of the groups, the `offs` of torch._grouped_mm
    n_tokens: int
    # [E] long: tokens of *this* batch routed to each of all E experts, wherever they live: what balancing counts.
    # On one device the experts here are all E and it is `counts`; with expert parallelism the two differ.
    routed_counts: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.routed_counts is None:
            self.routed_counts = self.counts


class LocalDispatcher:
    """Groups token slots by expert with one argsort on the local device: no host synchronization, no loop over
    experts, in the forward or the backward."""

    def __init__(self, n_experts: int):
        self.n_experts = n_experts

    def dispatch(self, x: torch.Tensor, indices: torch.Tensor,
                 weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, DispatchPlan]:
        """x [T, hidden], indices/weights [T, top_k] -> (rows [T*top_k, hidden] grouped by expert, their routing
        weights [T*top_k], the plan)."""
        if indices.shape != weights.shape or indices.dim() != 2 or indices.shape[0] != x.shape[0]:
            raise ValueError(f"expected indices and weights of shape [tokens={x.shape[0]}, top_k], got "
                             f"{tuple(indices.shape)} and {tuple(weights.shape)}")
        T, top_k = indices.shape
        flat = indices.reshape(-1)  # [T * top_k] expert of each slot, token-major
        order = flat.argsort(stable=True)  # [T * top_k] slots grouped by expert
        counts = torch.zeros(self.n_experts, dtype=torch.long, device=x.device).scatter_add_(
            0, flat, torch.ones_like(flat))
        plan = DispatchPlan(token=order // top_k, expert=flat.index_select(0, order), counts=counts,
                            offsets=counts.cumsum(0).to(torch.int32), n_tokens=T)
        # index_select, not x[token]: its backward is an index_add, far faster on CPU than indexing's index_put.
        return x.index_select(0, plan.token), weights.reshape(-1).index_select(0, order), plan

    def combine(self, rows: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """Sum each token's expert outputs: rows [T*top_k, hidden] in dispatch order -> [T, hidden]."""
        out = rows.new_zeros(plan.n_tokens, rows.shape[1])
        return out.index_add(0, plan.token, rows)
