"""The SwiGLU feed-forward network: the dense layers' MLP and the MoE's shared experts."""

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """down(silu(gate(x)) * up(x)); with `swiglu_limit` (DeepSeek-V4) gate(x) <= limit, up(x) in [-limit, limit]."""

    def __init__(self, hidden_size: int, intermediate_size: int, swiglu_limit: float | None = None):
        super().__init__()
        self.swiglu_limit = swiglu_limit
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu_limit is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        limit = self.swiglu_limit
        return self.down_proj(F.silu(self.gate_proj(x).clamp(max=limit)) * self.up_proj(x).clamp(-limit, limit))
