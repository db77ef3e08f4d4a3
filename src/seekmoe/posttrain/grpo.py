"""Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath; DeepSeek-R1): its settings and its math.

For each prompt G completions are sampled; each gets the advantage (r - mean of its group) / (std of its group),
shared by all its tokens. The per-token objective is PPO's clipped surrogate against the sampling policy,
min(ratio * A, clip(ratio, 1 - epsilon, 1 + epsilon_high) * A) with ratio = pi_theta / pi_old, minus beta times
the KL to a frozen reference policy, estimated per token as DeepSeekMath does (Schulman's k3, unbiased and >= 0):
    KL ~= pi_ref / pi_theta - log(pi_ref / pi_theta) - 1.
How per-token losses are averaged is TRL's `loss_type`:
- `grpo`: each completion's mean over its tokens, then the mean over completions (DeepSeekMath; long completions'
  tokens weigh less);
- `dapo`: the mean over every completion token of the step (DAPO, Yu et al. 2025; TRL's default);
- `dr_grpo`: the sum over every completion token divided by completions x max_new_tokens (Dr. GRPO, Liu et al.
  2025: no length bias), usually with scale_rewards=False.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields

import torch

LOSS_TYPES = ("grpo", "dapo", "dr_grpo")
STD_EPS = 1e-4  # TRL's: a group whose rewards are all equal gets advantages 0, not 0/0


@dataclass
class GRPOConfig:
    """Settings of a GRPO run besides the optimizer's (TrainConfig); every field can be set by field=value."""

    num_generations: int = 8  # G: completions sampled per prompt
    prompts_per_step: int = 8  # prompts per optimizer step (so G x this completions)
    max_new_tokens: int = 16  # TRL's max_completion_length
    temperature: float = 1.0  # of the rollouts
    beta: float = 0.0  # KL weight (DeepSeekMath 0.04, R1 0.001, TRL 0); 0 keeps no reference model
    epsilon: float = 0.2  # the clip range's lower side (and upper, unless epsilon_high)
    epsilon_high: float | None = None  # DAPO's clip-higher, e.g. 0.28; None = epsilon
    loss_type: str = "dapo"  # grpo | dapo | dr_grpo
    scale_rewards: bool = True  # divide by the group's std (False: Dr. GRPO)
    num_iterations: int = 1  # optimizer steps per rollout batch (mu); > 1 makes the clipping bite
    routing_replay: bool = True  # train on the experts each token was sampled with
    eval_prompts: int = 64  # held-out prompts scored greedily before and after
    reward_timeout: float = 30.0  # seconds one reward(prompt, completion) call may take (a user task's)

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"GRPOConfig.{name}={getattr(self, name)!r} is invalid: expected {expected}")

        for name in ("num_generations", "prompts_per_step", "max_new_tokens", "num_iterations", "eval_prompts"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(name, "a positive integer")
        if self.num_generations < 2:
            raise bad("num_generations", "at least 2 (a group's advantage compares its completions)")
        if not _finite_number(self.temperature) or self.temperature <= 0:
            raise bad("temperature", "a finite number > 0 (GRPO samples)")
        for name in ("beta", "epsilon"):
            if not _finite_number(getattr(self, name)) or getattr(self, name) < 0:
                raise bad(name, "a finite number >= 0")
        if not _finite_number(self.reward_timeout) or self.reward_timeout <= 0:
            raise bad("reward_timeout", "a finite number of seconds > 0")
        if self.epsilon_high is not None and (not _finite_number(self.epsilon_high)
                                              or self.epsilon_high < self.epsilon):
            raise bad("epsilon_high", f"None or a number >= epsilon={self.epsilon}")
        if self.loss_type not in LOSS_TYPES:
            raise bad("loss_type", f"one of {LOSS_TYPES}")
        for name in ("scale_rewards", "routing_replay"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "true or false")

    @classmethod
    def split_overrides(cls, overrides: dict) -> tuple["GRPOConfig", dict]:
        """(a GRPOConfig of the GRPO fields among `overrides`, the other fields)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in overrides.items() if k in names}), \
            {k: v for k, v in overrides.items() if k not in names}

    def to_dict(self) -> dict:
        """The fields as a JSON-able dict."""
        return dataclasses.asdict(self)


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> torch.Tensor:
    """Advantages [N] of rewards [N] laid out group after group: (r - group mean) / (group std + 1e-4), the std
    unbiased as torch (and TRL) compute it; without `scale` just r - group mean."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.float().view(-1, group_size)  # [prompts, G]
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        centered = centered / (grouped.std(dim=1, keepdim=True) + STD_EPS)
    return centered.view(-1)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi_theta || pi_ref) estimate pi_ref/pi_theta - log(pi_ref/pi_theta) - 1 (>= 0)."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              config: GRPOConfig, denominator: float, ref_logp: torch.Tensor | None = None,
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss of a micro-batch and its figures (kl, clip_fraction: means over its completion tokens).

    logp, old_logp, ref_logp, mask: [B, S] per completion token (mask 1 on completion tokens, 0 elsewhere);
    advantages [B]. `denominator` is what `loss_type` divides by over the whole step (completions for grpo,
    completion tokens for dapo, completions x max_new_tokens for dr_grpo), so micro-batches sum to the step's loss.
    """
    mask = mask.float()
    ratio = torch.exp(logp - old_logp)
    eps_high = config.epsilon if config.epsilon_high is None else config.epsilon_high
    adv = advantages[:, None]  # [B, 1]
    clipped = ratio.clamp(1 - config.epsilon, 1 + eps_high)
    per_token = -torch.min(ratio * adv, clipped * adv)  # [B, S]
    tokens = mask.sum().clamp(min=1)
    metrics = {}
    with torch.no_grad():
        clip = ((ratio < 1 - config.epsilon) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
        metrics["clip_fraction"] = (clip.float() * mask).sum() / tokens
    if ref_logp is not None:
        kl = k3_kl(logp, ref_logp)
        metrics["kl"] = (kl.detach() * mask).sum() / tokens
        if config.beta:
            per_token = per_token + config.beta * kl
    if config.loss_type == "grpo":
        loss = ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).sum() / denominator
    else:
        loss = (per_token * mask).sum() / denominator
    return loss, metrics
