"""Routed experts: E SwiGLU experts stored as stacked [E, ...] weights, applied with a sort-based dispatch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _has_grouped_mm() -> bool:
    return hasattr(torch, "_grouped_mm")


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows x[offsets[e-1]:offsets[e]] times w[e] for every expert e: x [M, K], w [E, K, N] -> [M, N].

    Uses torch._grouped_mm where the build has it; otherwise pads the groups into one batched matmul.
    """
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w = x.to(dtype), w.to(dtype)
    else:
        w = w.to(x.dtype)
    if _has_grouped_mm():
        return torch._grouped_mm(x, w, offs=offsets.to(torch.int32))
    return _padded_grouped_mm(x, w, offsets)


def _padded_grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Fallback for torch builds without _grouped_mm: scatter groups into [E, max_rows, K] and bmm."""
    E, M = w.shape[0], x.shape[0]
    counts = torch.diff(offsets, prepend=offsets.new_zeros(1))
    capacity = int(counts.max()) if M else 0  # one host sync: the padded size must be known
    expert = torch.repeat_interleave(torch.arange(E, device=x.device), counts, output_size=M)
    row = torch.arange(M, device=x.device) - (offsets - counts)[expert]
    padded = x.new_zeros(E, max(capacity, 1), x.shape[1])
    padded[expert, row] = x
    return torch.bmm(padded, w)[expert, row]


class RoutedExperts(nn.Module):
    """E SwiGLU experts. gate_up_proj [E, 2*moe_intermediate_size, hidden] holds each expert's gate rows then its
    up rows; down_proj [E, hidden, moe_intermediate_size]."""

    def __init__(self, n_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.n_experts = n_experts
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Weighted sum of each token's chosen experts. x [T, hidden], indices/weights [T, top_k].

        Returns the output [T, hidden] and the number of tokens each expert received [E].
        """
        T, top_k = indices.shape
        flat = indices.reshape(-1)  # [T * top_k] expert of each token slot
        order = flat.argsort(stable=True)  # slots grouped by expert
        counts = torch.zeros(self.n_experts, dtype=torch.long, device=x.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat))
        offsets = counts.cumsum(0)
        token = order // top_k
        h = grouped_mm(x[token], self.gate_up_proj.transpose(1, 2), offsets)  # [T*k, 2I]
        gate, up = h.chunk(2, dim=-1)
        y = grouped_mm(F.silu(gate) * up, self.down_proj.transpose(1, 2), offsets)  # [T*k, hidden]
        y = y * weights.reshape(-1)[order].unsqueeze(-1).to(y.dtype)
        out = torch.zeros(T, x.shape[1], dtype=y.dtype, device=x.device).index_add_(0, token, y)
        return out.to(x.dtype), counts
