"""The DeepSeek router: fp32 affinity scores, (group-limited) top-k selection, and normalized, scaled weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig


@dataclass
class RouterOutput:
    """What one routing decision produced for T tokens."""

    weights: torch.Tensor  # [T, top_k] fp32 gate values multiplying the chosen experts' outputs
    indices: torch.Tensor  # [T, top_k] chosen expert ids
    scores: torch.Tensor  # [T, E] fp32 affinities (softmax or sigmoid of the logits), before any bias
    logits: torch.Tensor  # [T, E] fp32 router logits
    # [T, top_k] bool: the slots that reach their expert (None = all). A dropped slot (over an expert's capacity, or
    # GShard's randomly skipped second expert) keeps its index but has weight 0: its token passes the residual.
    kept: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None  # scalar, weighted: a literature router's own balance loss (training)


class Router(nn.Module):
    """Scores every routed expert for each token and picks `num_experts_per_tok` of them.

    With `topk_method='noaux_tc'` (DeepSeek-V3) a per-expert `e_score_correction_bias` is added to the scores for
    *selection only*: it shifts which experts are chosen, never the weights they get, and it moves by the
    auxiliary-loss-free balancing rule (`update_bias`), not by gradients.
    """

    def __init__(self, config: ModelConfig):
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
        if self.topk_method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

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

    def forward(self, x: torch.Tensor, indices: torch.Tensor | None = None, top_k: int | None = None,
                skip_top: int = 0) -> RouterOutput:
        """Route x [T, hidden]. Everything here is fp32 whatever the autocast state: under bf16 autocast a bf16
        router picks a different expert set for a sizeable share of tokens (DeepSeek-V3 keeps its gating in fp32,
        Megatron-Core's moe_router_dtype=fp32 exists for the same reason).

        `indices` [T, top_k], when given, are used instead of choosing (routing replay: RL trains on the experts its
        rollout used; rows of -1 are chosen as usual); the weights are still this forward's scores of those
        experts, so the router keeps learning. `top_k` and `skip_top` exist for inference-time probes
        (`seekmoe analyze`, DeepSeekMoE section 4.5): route to `top_k` experts instead of `num_experts_per_tok`,
        after excluding each token's `skip_top` best ones."""
        top_k = top_k or self.top_k
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())  # [T, E]
            scores = logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)
            choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
            with torch.no_grad():
                choice = choice.detach()
                if skip_top:
                    choice = choice.scatter(1, choice.topk(skip_top, dim=-1).indices, float("-inf"))
                chosen = self._select(choice, top_k)
                # -1 in a replayed row: a token the replay has no record of, routed as usual
                indices = chosen if indices is None else torch.where(indices >= 0, indices, chosen)
            weights = scores.gather(1, indices)  # [T, top_k]
            if self.norm_topk_prob and top_k > 1:
                weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
            return RouterOutput(weights * self.routed_scaling_factor, indices, scores, logits)

    def _select(self, choice: torch.Tensor, top_k: int) -> torch.Tensor:
        """Top-k expert ids [T, top_k], restricted to the `topk_group` best groups unless greedy."""
        if self.topk_method != "greedy" and self.n_group > 1:
            T = choice.shape[0]
            grouped = choice.view(T, self.n_group, -1)  # [T, groups, experts per group]
            if self.topk_method == "noaux_tc":
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            else:
                group_scores = grouped.amax(dim=-1)
            chosen = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices  # [T, topk_group]
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, chosen, True)
            choice = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(T, -1)
        return choice.topk(top_k, dim=-1, sorted=False).indices

    @torch.no_grad()
    def update_bias(self, expert_counts: torch.Tensor, speed: float) -> None:
        """Auxiliary-loss-free balancing: bias += speed * sign(mean load - load), from token counts [E]."""
        if self.e_score_correction_bias is None or speed == 0:
            return
        load = expert_counts.to(self.e_score_correction_bias.device, torch.float32)
        self.e_score_correction_bias += speed * torch.sign(load.mean() - load)
