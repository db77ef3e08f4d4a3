"""Expert parallelism: each of `ep` ranks holds n_routed_experts / ep routed experts, and token rows travel to the
rank of their expert and back with all-to-all exchanges.

`AllToAllDispatcher` has `LocalDispatcher`'s interface (model/dispatch.py), so `MoE.forward` is unchanged: the router
before it and the expert math after it never learn that tokens left the process. Its dispatch:
1. sorts this rank's token slots by global expert (as LocalDispatcher does);
2. exchanges the per-expert counts (all_to_all_single on [E] counts) so each rank learns how many rows it receives
   for each of its local experts from each source rank;
3. exchanges the rows and their fp32 routing weights (all_to_all_single, differentiable);
4. regroups the received rows by local expert for the grouped GEMMs.
`combine` undoes 4 and 3 and sums each token's expert outputs, as LocalDispatcher.combine does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from ..model.dispatch import DispatchPlan
from ..model.experts import ExpertWeights, WeightProvider


class _AllToAll(torch.autograd.Function):
    """all_to_all_single whose backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (in_splits, out_splits), group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        back_out, back_in = ctx.splits
        out = grad.new_empty((sum(back_out),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), back_out, back_in, group=ctx.group)
        return out, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Send x's rows in blocks of `in_splits` to each rank; receive blocks of `out_splits` (differentiable)."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


@dataclass
class ExpertParallelPlan(DispatchPlan):
    """A DispatchPlan over this rank's local experts, plus what `combine` needs to send the rows home."""

    sent_token: torch.Tensor | None = None  # [T * top_k] source token of each sent slot, in sending order
    received_order: torch.Tensor | None = None  # [R] received row -> position in local-expert order
    send_splits: list[int] | None = None  # rows sent to each EP rank
    recv_splits: list[int] | None = None  # rows received from each EP rank


class AllToAllDispatcher:
    """Dispatch/combine across the `ep` ranks of `group`, this one holding experts
    [rank * E_local, (rank + 1) * E_local)."""

    def __init__(self, n_experts: int, group):
        self.n_experts = n_experts
        self.group = group
        self.ep = dist.get_world_size(group)
        self.n_local = n_experts // self.ep
        self.bytes_sent = 0  # token rows and weights this rank sent to other ranks, dispatch and combine (a metric)

    def dispatch(self, x: torch.Tensor, indices: torch.Tensor,
                 weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, ExpertParallelPlan]:
        """x [T, hidden], indices/weights [T, top_k] -> (rows of the local experts [R, hidden] grouped by local
        expert, their routing weights [R], the plan)."""
        T, top_k = indices.shape
        flat = indices.reshape(-1)  # [T * top_k]
        order = flat.argsort(stable=True)  # slots grouped by global expert, hence by destination rank
        routed = torch.zeros(self.n_experts, dtype=torch.long, device=x.device).scatter_add_(
            0, flat, torch.ones_like(flat))  # [E] this rank's slots per global expert
        received = torch.empty_like(routed)  # [ep * E_local]: from source s, rows for local expert e
        dist.all_to_all_single(received, routed, group=self.group)
        # The one host synchronization: all_to_all_single needs its split sizes on the host.
        sizes = torch.stack([routed.view(self.ep, -1).sum(1), received.view(self.ep, -1).sum(1)]).tolist()
        send_splits, recv_splits = sizes
        sent_token = order // top_k
        rank = dist.get_rank(self.group)
        out_rows = sum(n for i, n in enumerate(send_splits) if i != rank)  # rows leaving in dispatch (+ weights)
        back_rows = sum(n for i, n in enumerate(recv_splits) if i != rank)  # rows this rank returns in combine
        self.bytes_sent += (out_rows + back_rows) * x.shape[1] * x.element_size() + out_rows * 4
        rows = all_to_all(x.index_select(0, sent_token), recv_splits, send_splits, self.group)
        row_weights = all_to_all(weights.reshape(-1).float().index_select(0, order), recv_splits, send_splits,
                                 self.group)
        # Received rows come grouped by source rank, then by local expert: regroup them by local expert.
        per_source = received.view(self.ep, self.n_local)  # [ep, E_local]
        local_expert = torch.arange(self.n_local, device=x.device).repeat(self.ep).repeat_interleave(
            per_source.reshape(-1))  # [R] local expert of each received row
        regroup = local_expert.argsort(stable=True)
        counts = per_source.sum(0)  # [E_local]
        plan = ExpertParallelPlan(token=regroup, expert=local_expert.index_select(0, regroup), counts=counts,
                                  offsets=counts.cumsum(0).to(torch.int32), n_tokens=T, routed_counts=routed,
                                  sent_token=sent_token, received_order=regroup, send_splits=send_splits,
                                  recv_splits=recv_splits)
        return rows.index_select(0, regroup), row_weights.index_select(0, regroup), plan

    def combine(self, rows: torch.Tensor, plan: ExpertParallelPlan) -> torch.Tensor:
        """Send the local experts' outputs [R, hidden] back and sum them per token -> [T, hidden]."""
        back = torch.empty_like(rows).index_copy(0, plan.received_order, rows)  # source-rank order again
        home = all_to_all(back, plan.send_splits, plan.recv_splits, self.group)  # [T * top_k] in sending order
        return home.new_zeros(plan.n_tokens, home.shape[1]).index_add(0, plan.sent_token, home)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by `scale`."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class ExpertShards(WeightProvider):
    """The weight provider of expert parallelism: the experts' stacks are DTensors sharded by expert over the mesh's
    `ep` dimension, and the grouped GEMMs run on this rank's shard, experts [rank * E_local, (rank + 1) * E_local).
    `grad_scale` multiplies the local weights' gradients (see fsdp.py for why). It comes first: the providers after
    it (freezing, adapters) see the local experts only."""

    order = 10

    def __init__(self, first_expert: int):
        super().__init__()
        self.first_expert = first_expert
        self.grad_scale = 1.0

    def forward(self, weights: ExpertWeights) -> ExpertWeights:
        local = [w.to_local() if isinstance(w, DTensor) else w for w in (weights.gate_up_proj, weights.down_proj)]
        if self.grad_scale != 1.0:
            local = [_ScaleGrad.apply(w, self.grad_scale) if w.requires_grad else w for w in local]
        return ExpertWeights(*local, first_expert=self.first_expert)


def apply_expert_parallel(model: nn.Module, mesh: DeviceMesh) -> None:
    """Shard every MoE layer's routed experts over `mesh`'s `ep` dimension (replicated over `dp_mod_ep`, which FSDP
    then shards) and route its tokens with an AllToAllDispatcher. Every rank must hold the same initialized model."""
    group = mesh["ep"].get_group()
    ep = mesh["ep"].size()
    for moe in model.moe_layers():
        experts = moe.experts
        experts.add_provider("shards", ExpertShards(mesh["ep"].get_local_rank() * (experts.n_experts // ep)))
        for name in ("gate_up_proj", "down_proj"):
            full = getattr(experts, name)
            shard = distribute_tensor(full.data, mesh, [Replicate(), Shard(0)])
            setattr(experts, name, nn.Parameter(shard, requires_grad=full.requires_grad))
        experts.n_experts = moe.config.n_routed_experts // ep
        moe.dispatcher = AllToAllDispatcher(moe.config.n_routed_experts, group)
        moe.device_groups = ep  # the device-level balance loss balances the EP ranks
