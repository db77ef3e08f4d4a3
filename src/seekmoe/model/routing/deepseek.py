"""DeepSeek's router: fp32 affinity scores, (group-limited) top-k selection, and normalized, scaled weights.

With `modality_expert_groups` (MoMa-style modality-aware experts, Lin et al. 2024) the router groups are split between
image and text tokens: a token's affinities are those of its modality's experts alone and its ranking is -inf
elsewhere, so it routes as a router holding only those experts would — a probe's skipped best experts, the group
limit (`topk_group` best groups), the top-k, the weights and the balance losses all stay inside the modality. A token
is an image token when its id is `media_placeholder_token_id` (a vision-language model replaces those tokens'
embeddings with image features); every other token is a text token.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass
class DeepSeekScores(Scores):
    """The DeepSeek router's scoring; with modality groups its ranking is -inf outside each token's groups."""

    allowed: torch.Tensor | None = None  # [T, n_group] bool: the groups each token may choose from (None: all)


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
        # Modality-aware routing: each modality's groups as the bits of one int (validated: n_group <= 63), so a
        # token's allowed groups come from its id with no constant tensor to keep on the right device (a buffer would
        # need refilling after every meta-device build) and no host sync.
        groups = config.modality_expert_groups
        self.media_token_id = config.media_placeholder_token_id if groups else None
        self.modality_bits = {m: sum(1 << g for g in groups[m]) for m in ("image", "text")} if groups else None

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

    def score(self, hidden: torch.Tensor, token_ids: torch.Tensor | None) -> DeepSeekScores:
        """Affinities of the fp32 logits by `scoring_func` (SCORING: sigmoid V3, softmax V2, sqrtsoftplus V4); the
        ranking adds the selection bias. With
        modality groups a token's affinities are those of its modality's experts alone (0 elsewhere; softmax over
        them only) and its ranking is -inf elsewhere: it routes as a router holding only those experts would."""
        logits = F.linear(hidden.float(), self.weight.float())  # [T, E]
        allowed = self.allowed_groups(token_ids)  # [T, groups] bool, or None
        if allowed is None:
            scores = SCORING[self.scoring_func](logits)
            ranking = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
            return DeepSeekScores(logits, scores, ranking)
        # The affinities outside the modality are 0, not just unranked: the MoE layer's balance losses then count
        # each token's plain top-k and normalized affinities among the experts it may use, so they balance each
        # modality's experts, and the final top-k (k <= the experts a modality reaches, validated) never takes a
        # -inf expert even when topk_group exceeds the modality's groups.
        outside = ~allowed.repeat_interleave(self.n_experts // self.n_group, dim=1)  # [T, E]
        if self.scoring_func == "softmax":
            scores = logits.masked_fill(outside, float("-inf")).softmax(dim=-1)
        else:  # elementwise scorings (sigmoid, sqrtsoftplus)
            scores = SCORING[self.scoring_func](logits).masked_fill(outside, 0.0)
        ranking = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        return DeepSeekScores(logits, scores, ranking.masked_fill(outside, float("-inf")), allowed)

    def allowed_groups(self, token_ids: torch.Tensor | None) -> torch.Tensor | None:
        """The router groups each token may choose from, [T, n_group] bool (None: every group, no modality split).
        Image tokens (id == media_placeholder_token_id) get the image groups, every other token the text groups."""
        if self.modality_bits is None:
            return None
        if token_ids is None:
            raise ValueError("modality-aware routing (modality_expert_groups) tells image from text tokens by their "
                             "ids: expected token_ids [T] with the hidden states, got None")
        bits = torch.where(token_ids == self.media_token_id, self.modality_bits["image"],
                           self.modality_bits["text"])  # [T] long
        group = torch.arange(self.n_group, device=token_ids.device)
        return ((bits[:, None] >> group) & 1).bool()  # [T, n_group]

    def select(self, scored: DeepSeekScores, ranking: torch.Tensor, k: int,
               token_ids: torch.Tensor | None) -> torch.Tensor:
        """Top-k expert ids [T, k], inside the token's modality groups when `modality_expert_groups` is set, and
        restricted to the `topk_group` best of those groups unless greedy."""
        allowed = scored.allowed  # [T, groups] bool with modality groups (the ranking is already masked), or None
        if self.topk_method != "greedy" and self.n_group > 1:
            T = ranking.shape[0]
            grouped = ranking.view(T, self.n_group, -1)  # [T, groups, experts per group]
            if self.topk_method == "noaux_tc":
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            else:
                group_scores = grouped.amax(dim=-1)
            if allowed is not None:
                # the modality's groups outrank all others, even one whose score is -inf because a probe skipped
                # its best expert (a tie at -inf with the other modality's groups would let topk_group pick those)
                lowest = torch.finfo(group_scores.dtype).min
                group_scores = torch.where(allowed, group_scores.clamp_min(lowest), float("-inf"))
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
        """All E, or the experts of topk_group groups when group-limited; with modality groups, the fewer that a
        token of either modality can reach."""
        per_group = self.n_experts // self.n_group
        limited = self.topk_method != "greedy" and self.n_group > 1
        if self.modality_bits is not None:
            return min(per_group * (min(n, self.topk_group) if limited else n)
                       for n in (bin(b).count("1") for b in self.modality_bits.values()))
        return self.topk_group * per_group if limited else self.n_experts

    @torch.no_grad()
    def update_bias(self, expert_counts: torch.Tensor, speed: float) -> None:
        """Auxiliary-loss-free balancing: bias += speed * sign(mean load - load), from token counts [E]. With
        modality groups the mean is over the expert's own modality: image and text tokens come in any ratio, and
        against the mean of all experts every expert of the rarer modality would be underloaded and rise alike,
        which would leave its modality's experts unbalanced among themselves."""
        if self.e_score_correction_bias is None or speed == 0:
            return
        load = expert_counts.to(self.e_score_correction_bias.device, torch.float32)
        if self.modality_bits is None:
            mean = load.mean()
        else:
            grouped = load.view(self.n_group, -1)  # [groups, experts per group]
            mean = torch.empty_like(grouped)
            for bits in self.modality_bits.values():
                mine = torch.tensor([bool(bits >> g & 1) for g in range(self.n_group)], device=load.device)
                mean[mine] = grouped[mine].mean()
            mean = mean.view(-1)
        self.e_score_correction_bias += speed * torch.sign(mean - load)
