"""Bringing traffic to experts that `seekmoe expand --init zero` added out of reach, faster than the ordinary
auxiliary-loss-free bias update would.

That update moves every expert's selection bias by `bias_update_speed` * sign(mean load - load) a step. An added
expert starts more than 1 (the whole range of sigmoid scores) below the old experts' biases; while it gets no
tokens every old expert is above the mean load, so the gap closes by 2 x speed a step, and at DeepSeek-V3's speed of
0.001 the new expert would wait about five hundred steps for its first token (54 at the small preset's 0.01, in
benchmarks/grow.py). For the first
`new_expert_onboarding_steps` steps of a run, the new experts' biases move at `new_expert_bias_update_speed`
instead. Dormant slots (layers that `--layers` left out) are held out of reach at every step.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model.moe import MoE
from .grown_experts import GrowRecord, unselectable_bias


class NewExpertOnboarding:
    """Runs after each optimizer step's bias update (see the module docstring)."""

    def __init__(self, model: nn.Module, record: GrowRecord, speed: float, steps: int):
        self.speed, self.steps = speed, steps
        layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]  # moe_layers() order
        self.rows = [(row, m.gate, record.new.get(name), record.dormant.get(name)) for row, (name, m)
                     in enumerate(layers) if name in record.new or name in record.dormant]

    @classmethod
    def for_run(cls, model: nn.Module, speed: float, steps: int) -> "NewExpertOnboarding | None":
        """The onboarding of `model`'s added experts, or None when it has none (or nothing to do)."""
        record = GrowRecord.of(model.config)
        if record is None or not (record.dormant or (speed > 0 and steps > 0)):
            return None
        return cls(model, record, speed, steps)

    @torch.no_grad()
    def after_step(self, step: int, expert_counts: torch.Tensor | None, bias_update_speed: float) -> None:
        """Correct the biases after 0-based optimizer step `step`, whose bias update used `bias_update_speed` and
        counted `expert_counts` [MoE layers, E] tokens."""
        fast = step < self.steps and self.speed > 0 and expert_counts is not None
        for row, gate, new, dormant in self.rows:
            bias = gate.e_score_correction_bias
            if bias is None:
                continue
            if fast and new:
                ids = torch.tensor(new, device=bias.device)
                load = expert_counts[row].to(bias.device, torch.float32)
                direction = torch.sign(load.mean() - load[ids])
                bias.index_add_(0, ids, (self.speed - bias_update_speed) * direction)
            if dormant:
                ids = torch.tensor(dormant, device=bias.device)
                live = torch.ones_like(bias, dtype=torch.bool).index_fill_(0, ids, False)
                bias.index_fill_(0, ids, float(unselectable_bias(bias[live])))
