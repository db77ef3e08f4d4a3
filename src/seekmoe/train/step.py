"""One optimizer step: forward and backward over the micro-batches, the gradient check, clipping, AdamW, and the
auxiliary-loss-free bias update from the step's global expert counts."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from ..model.moe import BalanceWindow
from .balance import update_router_biases

Reduce = Callable[[torch.Tensor], torch.Tensor]  # sums a tensor over every data-parallel rank (identity alone)
LOSS_PARTS = ("loss", "lm_loss", "mtp_loss", "balance_loss")
# The objective of a micro-batch: forward(model, batch, device, balance_window, mtp_loss_weight=lambda) -> an output
# with the LOSS_PARTS (None where absent), `expert_counts`, and optionally `metrics`, a dict of scalar tensors averaged
# over the step. Its weights come as arguments (the MTP lambda of this step's schedule), never through model.config.
Forward = Callable[..., object]


def language_model_forward(model: nn.Module, ids: torch.Tensor, device: torch.device,
                           window: BalanceWindow | None, mtp_loss_weight: float | None = None):
    """Pretraining's objective: the next-token loss over every token of ids [B, S], plus `mtp_loss_weight` times
    the MTP loss (None = the model config's lambda) and the balance losses."""
    ids = ids.to(device, non_blocking=True)
    return model(ids, labels=ids, balance_window=window, mtp_loss_weight=mtp_loss_weight)


@dataclass
class StepResult:
    """The losses (means over the step's micro-batches and ranks), the global expert counts and what happened."""

    loss: float
    lm_loss: float
    mtp_loss: float
    balance_loss: float
    expert_counts: torch.Tensor | None  # [n MoE layers, E] summed over micro-batches and ranks
    grad_norm: float | None = None
    skipped: str | None = None  # why the optimizer step was skipped (non-finite loss or gradients), else None
    metrics: dict = field(default_factory=dict)  # the objective's own figures (a `forward`'s `metrics`), step means


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """bf16 autocast on `device` when dtype says so, else nothing."""
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


class TrainStep:
    """Runs optimizer steps of `model` (already parallelized, if it is) with `optimizer`.

    `reduce` sums over data-parallel ranks (the losses reported, the expert counts, the finite check), so every rank
    takes the same decision and holds bit-identical router biases. `balance_scope='global'` counts the expert- and
    device-level balance losses over the whole step (every micro-batch, every rank) instead of each micro-batch.
    `forward` is the objective (default: pretraining's next-token loss; post-training gives its own).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float,
                 autocast_dtype: torch.dtype | None, device: torch.device, reduce: Reduce | None = None,
                 balance_scope: str = "global", forward: Forward | None = None):
        self.model = model
        self.forward = forward or language_model_forward
        self.optimizer = optimizer
        self.grad_clip = grad_clip
        self.autocast_dtype = autocast_dtype
        self.device = device
        self.reduce = reduce or (lambda t: t)
        self.window = BalanceWindow(reduce) if balance_scope == "global" else None
        self.moe_layers = model.moe_layers()

    def forward_backward(self, micro_batches: list, mtp_loss_weight: float | None = None,
                         ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """Accumulate the gradients of the mean loss over `micro_batches` (the MTP loss weighted by
        `mtp_loss_weight`, None = the model config's); returns (summed loss parts as tensors, expert counts of this
        rank [layers, E] or None)."""
        sums = {k: torch.zeros((), device=self.device) for k in LOSS_PARTS}
        counts = None
        if self.window is not None:
            self.window.reset()
        for batch in micro_batches:
            with autocast_context(self.device, self.autocast_dtype):
                out = self.forward(self.model, batch, self.device, self.window, mtp_loss_weight=mtp_loss_weight)
            (out.loss / len(micro_batches)).backward()
            for key in LOSS_PARTS:
                value = getattr(out, key)
                if value is not None:
                    sums[key] += value.detach().float() / len(micro_batches)
            for key, value in getattr(out, "metrics", {}).items():
                sums[key] = sums.get(key, 0) + torch.as_tensor(value, device=self.device).detach().float() \
                    / len(micro_batches)
            if out.expert_counts is not None:
                counts = out.expert_counts if counts is None else counts + out.expert_counts
        return sums, counts

    def __call__(self, micro_batches: list, lr: float, mtp_loss_weight: float,
                 bias_update_speed: float) -> StepResult:
        """One optimizer step at learning rate `lr`; skipped (gradients dropped) when the loss or any gradient is
        not finite on any rank."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        sums, counts = self.forward_backward(micro_batches, mtp_loss_weight)
        # One reduction carries the losses, the number of ranks and, when there are MoE layers, the counts.
        # float64: token counts stay exact integers far beyond fp32's 2**24
        extra = sorted(set(sums) - set(LOSS_PARTS))
        packed = torch.stack([sums[k] for k in LOSS_PARTS] + [torch.ones((), device=self.device)]
                             + [sums[k] for k in extra]).double()
        if counts is not None:
            packed = torch.cat([packed, counts.reshape(-1).double()])
        packed = self.reduce(packed)
        n = len(LOSS_PARTS)
        losses = (packed[:n] / packed[n]).tolist()  # the mean over ranks
        metrics = dict(zip(extra, (packed[n + 1:n + 1 + len(extra)] / packed[n]).tolist()))
        if counts is not None:
            counts = packed[n + 1 + len(extra):].round().long().view_as(counts)
        result = StepResult(*losses, expert_counts=counts, metrics=metrics)
        grad_norm = _grad_norm(self.model, self.grad_clip, self.reduce)
        result.grad_norm = grad_norm
        if not math.isfinite(result.loss):
            result.skipped = "non-finite loss"
        elif not math.isfinite(grad_norm):
            result.skipped = "non-finite gradients"
        if result.skipped:
            self.optimizer.zero_grad(set_to_none=True)
            return result
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if counts is not None:
            update_router_biases(self.moe_layers, counts, bias_update_speed)
        return result


def _grad_norm(model: nn.Module, grad_clip: float, reduce: Reduce) -> float:
    """The global gradient norm, clipping to `grad_clip` when it is > 0 and the norm is finite.

    Under FSDP2 (and expert parallelism) every element of a gradient lives on exactly one rank, as a local shard of
    a DTensor: the sum of squares over the local shards, summed over ranks, is the global norm squared. (torch's
    clip_grad_norm_ cannot mix DTensors of different meshes, as the experts' and the rest's are.)
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    if not local:
        return 0.0
    squares = torch.stack([g.detach().float().pow(2).sum() for g in local]).sum()
    norm = float(reduce(squares).sqrt())
    if grad_clip > 0 and math.isfinite(norm) and norm > grad_clip:
        scale = grad_clip / (norm + 1e-6)
        torch._foreach_mul_(local, scale)
    return norm
