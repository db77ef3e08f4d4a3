"""Muon (Keller Jordan 2024) with Moonlight's recipe ("Muon is Scalable for LLM Training", Moonshot 2025): the
momentum of each hidden weight matrix is orthogonalized by a Newton-Schulz iteration and scaled by
0.2 sqrt(max(A, B)), so that its update RMS matches AdamW's and Muon reuses AdamW's learning rate and decoupled weight
decay. Embeddings, the output head, norms, biases and routers stay on AdamW, in the same optimizer (`build_optimizer`
in optim.py chooses the groups), so the trainer, its schedules and its checkpoints see one optimizer.

On a 2-D weight this is torch.optim.Muon's step with `adjust_lr_fn="match_rms_adamw"` (tests/test_muon.py holds the
two equal); torch's own refuses the rest of what a MoE trains. Stacked experts [E, out, in] are E matrices, each
orthogonalized on its own (gate_up_proj's gate and up halves apart, as DeepSeek's per-expert checkpoints hold them).
Under FSDP a weight is a DTensor whose rows are split among ranks: each rank gathers the full matrix, orthogonalizes
it (redundantly: the matrices are small next to the forward) and keeps its own shard; expert stacks split only
along the expert dimension need no gathering at all.
"""

from __future__ import annotations

import math

import torch

# Keller Jordan's quintic coefficients (also torch.optim.Muon's): steepest slope at zero, five steps.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7


def newton_schulz(g: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Approximately orthogonalize each matrix of g [..., A, B] (U S V^T -> about U V^T, singular values near 1)."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    tall = x.shape[-2] > x.shape[-1]
    if tall:  # iterate on the smaller Gram matrix
        x = x.mT
    shape = x.shape
    x = x.reshape(-1, *shape[-2:])  # [matrices, A, B]
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=NS_EPS)  # spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.mT
        # fused multiply-adds (torch.optim.Muon's addmm, batched): the same rounding in bf16
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, poly, x, beta=a)
    x = x.reshape(shape)
    return x.mT if tall else x


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (gathered), or t itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _rows_local(t: torch.Tensor) -> bool:
    """Whether every rank's shard of t holds whole matrices of its last two dims: a plain tensor, or a DTensor of
    at least 3 dims split only along its leading (expert) dimension."""
    if not hasattr(t, "placements"):
        return True
    return t.ndim >= 3 and all(not p.is_shard() or p.dim == 0 for p in t.placements)


def orthogonalized_update(update: torch.Tensor, halves: int, steps: int, dtype: torch.dtype) -> torch.Tensor:
    """Newton-Schulz of `update` per matrix (split in `halves` along its rows, each orthogonalized on its own),
    scaled by Moonlight's 0.2 sqrt(max(A, B)); a DTensor comes back with the same placements."""
    local = _rows_local(update)
    g = update.to_local() if local and hasattr(update, "to_local") else _full(update)
    parts = g.chunk(halves, dim=-2) if halves > 1 else (g,)
    A, B = parts[0].shape[-2:]
    scale = 0.2 * math.sqrt(max(A, B))
    out = torch.cat([newton_schulz(p, steps, dtype) for p in parts], dim=-2).to(g.dtype) * scale
    if not hasattr(update, "placements"):
        return out
    from torch.distributed.tensor import DTensor, distribute_tensor

    if local:
        return DTensor.from_local(out, update.device_mesh, update.placements, run_check=False,
                                  shape=update.shape, stride=update.stride())
    # every rank computed the same full matrix: each keeps its own shard, no communication
    return distribute_tensor(out, update.device_mesh, update.placements, src_data_rank=None)


class Muon(torch.optim.Optimizer):
    """Muon for the groups marked `muon=True` (momentum, Nesterov, Newton-Schulz, Moonlight's RMS scale, decoupled
    weight decay), AdamW (torch.optim.AdamW's arithmetic) for the others; `halves=2` marks fused gate/up stacks."""

    def __init__(self, params, lr: float, weight_decay: float = 0.1, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 ns_dtype: torch.dtype | None = None):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        betas=betas, eps=eps, muon=False, halves=1)
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group["muon"]:
                    self._muon(p, group)
                else:
                    self._adamw(p, group)
        return loss

    def _muon(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf, grad, mu = state["momentum_buffer"], p.grad, group["momentum"]
        buf.lerp_(grad, 1 - mu)
        update = grad.lerp(buf, mu) if group["nesterov"] else buf
        # bf16 where matrix units make it fast (as torch's and Keller's Muon), fp32 on a CPU (bf16 emulated on many)
        dtype = self.ns_dtype or (torch.bfloat16 if p.device.type == "cuda" else torch.float32)
        step = orthogonalized_update(update, group["halves"], group["ns_steps"], dtype)
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(step.to(p.dtype), alpha=-group["lr"])

    def _adamw(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        (beta1, beta2), lr, grad = group["betas"], group["lr"], p.grad
        state["step"] += 1
        step = state["step"].item()
        p.mul_(1 - lr * group["weight_decay"])
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2 ** step)).add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1 ** step))
