"""DeepSeek's router: fp32 affinity scores, (group-limited) top-k selection, and normalized, scaled weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...config import ModelConfig
from .interface import Router, RouterOutput, Scores


# scoring_func -> the affinities of the router logits [T, E] (fp32).
SCORING = {
    "sigmoid": torch.sigmoid,  # DeepSeek-V3
    "softmax": lambda logits: logits.softmax(dim=-1),  # DeepSeek-V2
    "sqrtsoftplus": lambda logits: F.softplus(logits).sqrt(),  # DeepSeek-V4
}


class DeepSeekRouter(Router):
    """Scores every routed expert for each token and picks `num_experts_per_tok` of them.

    With `topk_method='noaux_tc'` (DeepSeek-V3) a per-expert `e_score_correction_bias` is added to the scores for
    *selection only*: it shifts which experts are chosen, never the weights they get, and it moves by the
    auxiliary-loss-free balancing rule (`update_bias`), not by gradients.
    """

    uses_balance_losses = True

    def __init__(self, config: ModelConfig, selection_bias: bool | None = None):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_experts = config.n_routed_experts
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.topk_method = config.topk_method
        self.scoring_func = config.scoring_func
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.hidden_size))
        if self.topk_method == "noaux_tc" if selection_bias is None else selection_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None
        self.uses_bias_balancing = self.e_score_correction_bias is not None

    def _apply(self, fn, recurse=True):
        # The selection bias stays fp32, bit for bit, whatever dtype the model is cast to: its steps
        # (bias_update_speed ~ 1e-3) would vanish in bf16, and a round trip through bf16 would move the balancing
        # state of a run. So the cast result is discarded and the original fp32 values are moved to the new device.
        bias = self.e_score_correction_bias
        super()._apply(fn, recurse)
        if bias is not None:
            moved = self.e_score_correction_bias
            if moved.dtype != torch.float32:
                self.e_score_correction_bias = bias.to(device=moved.device, dtype=torch.float32)
        return self

    @torch.no_grad()
    def reset_parameters(self, std: float) -> None:
        """Normal(0, std) router weights, a zero selection bias."""
        self.weight.normal_(0.0, std)
        if self.e_score_correction_bias is not None:
            self.e_score_correction_bias.zero_()

    def score(self, hidden: torch.Tensor, token_ids: torch.Tensor | None) -> Scores:
        """Affinities of the fp32 logits by `scoring_func` (SCORING: sigmoid V3, softmax V2, sqrtsoftplus V4); the
        ranking adds the selection bias."""
        logits = F.linear(hidden.float(), self.weight.float())  # [T, E]
        scores = SCORING[self.scoring_func](logits)
        ranking = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        return Scores(logits, scores, ranking)

    def select(self, scored: Scores, ranking: torch.Tensor, k: int, token_ids: torch.Tensor | None) -> torch.Tensor:
        """Top-k expert ids [T, k], restricted to the `topk_group` best groups unless greedy."""
        if self.topk_method != "greedy" and self.n_group > 1:
            T = ranking.shape[0]
            grouped = ranking.view(T, self.n_group, -1)  # [T, groups, experts per group]
            if self.topk_method == "noaux_tc":
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            else:
                group_scores = grouped.amax(dim=-1)
            chosen = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices  # [T, topk_group]
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, chosen, True)
            ranking = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(T, -1)
        return ranking.topk(k, dim=-1, sorted=False).indices

    def weigh(self, scored: Scores, indices: torch.Tensor) -> RouterOutput:
        """The chosen experts' unbiased scores, normalized to sum 1 when `norm_topk_prob`, times the scaling factor."""
        weights = scored.scores.gather(1, indices)  # [T, k]
        if self.norm_topk_prob and indices.shape[1] > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return RouterOutput(weights * self.routed_scaling_factor, indices, scored.scores, scored.logits)

    def reachable_experts(self) -> int:
        """All E, or the experts of topk_group groups when group-limited."""
        if self.topk_method != "greedy" and self.n_group > 1:
            return self.topk_group * self.n_experts // self.n_group
        return self.n_experts

    @torch.no_grad()
    def update_bias(self, expert_counts: torch.Tensor, speed: float) -> None:
        """Auxiliary-loss-free balancing: bias += speed * sign(mean load - load), from token counts [E]."""
        if self.e_score_correction_bias is None or speed == 0:
            return
        load = expert_counts.to(self.e_score_correction_bias.device, torch.float32)
        self.e_score_correction_bias += speed * torch.sign(load.mean() - load)
