"""Routers of the MoE literature, for comparison with DeepSeek's (`router_type` in ModelConfig).

- switch (Fedus et al. 2021): top-1 of a softmax, weight = the chosen probability; loss alpha * E * sum_i f_i P_i.
- gshard (Lepikhin et al. 2020): top-2, g1 and g2 renormalized to sum to 1; in training the second expert is kept
  with probability min(1, g2 / second_expert_threshold) (mesh-tensorflow's "random" policy; evaluation keeps it);
  the same loss with f_i counting first choices.
- noisy_topk (Shazeer et al. 2017): logits + N(0, 1) * softplus(x W_noise) in training, keep the top k, softmax
  over them; the importance and load losses CV(sum of gates)^2 + CV(sum of P(x, i))^2.
- hash (Roller et al. 2021): a fixed random balanced table token id -> expert, weight 1; no learned router.
- hierarchical (Shazeer et al. 2017): a primary gate picks `topk_group` of `n_group` groups (keep-top-k softmax), a
  secondary gate per group picks num_experts_per_tok / topk_group experts inside each chosen group; weights
  multiplied; loss: the importance CV^2 at both levels.

Each is a `Router` (interface.py): it computes in fp32 (as DeepSeek's does), takes the flattened token ids (only hash
routing reads them) and, in training, returns its weighted balance loss (plus the router z-loss) as `aux_loss`. They
keep `mlp.gate.weight` [E, hidden] where they have one, so checkpoints keep the Hugging Face layout; their config.json
says `model_type: seekmoe_<router_type>`, which transformers does not know and so refuses to load.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...config import ModelConfig
from .interface import Router, RouterOutput, RoutingHook, Scores

HASH_SEED = 1234  # the hash routing table is a fixed function of the vocabulary size and the number of experts


def _router_input(x: torch.Tensor, jitter: float, training: bool) -> torch.Tensor:
    """x in fp32, times multiplicative U(1 - jitter, 1 + jitter) noise in training (Switch's router jitter)."""
    x = x.float()
    if training and jitter > 0:
        x = x * torch.empty_like(x).uniform_(1.0 - jitter, 1.0 + jitter)
    return x


def _z_loss(logits: torch.Tensor, coef: float) -> torch.Tensor:
    """ST-MoE's router z-loss: coef * mean over tokens of logsumexp(logits)^2."""
    return coef * torch.logsumexp(logits, dim=-1).pow(2).mean()


def _cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation var(x) / mean(x)^2 of a vector (0 for a constant one)."""
    return x.var(unbiased=False) / (x.mean().pow(2) + 1e-10)


def switch_balance_loss(probs: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """Switch/GShard's E * sum_i f_i P_i: f_i the share of tokens whose first choice `first` [T] is i, P_i the mean
    router probability of i over probs [T, E]; 1 when both are uniform."""
    E = probs.shape[-1]
    f = torch.zeros(E, device=probs.device).index_add_(0, first, torch.ones_like(first, dtype=torch.float32))
    return E * (f / first.numel() * probs.mean(dim=0)).sum()


class _LearnedGate(Router):
    """The fields every learned literature router shares: experts, k, input jitter, its balance-loss and z-loss
    weights, and a gate `weight` [rows, hidden] (rows = experts, or groups for the hierarchical gate)."""

    def __init__(self, config: ModelConfig, rows: int | None = None):
        super().__init__()
        self.n_experts, self.top_k = config.n_routed_experts, config.num_experts_per_tok
        self.jitter = config.router_jitter
        self.aux_coef = config.router_aux_loss()
        self.z_coef = config.router_z_loss_coef
        self.weight = nn.Parameter(torch.empty(rows or self.n_experts, config.hidden_size))


class SwitchRouter(_LearnedGate):
    """Switch Transformer's top-1 router: weight = the chosen expert's softmax probability."""

    @torch.no_grad()
    def reset_parameters(self, std: float) -> None:
        """Normal(0, std) router weights."""
        self.weight.normal_(0.0, std)

    def score(self, hidden: torch.Tensor, token_ids: torch.Tensor | None) -> Scores:
        """Softmax probabilities of the (jittered in training) fp32 logits; they are also the ranking."""
        logits = F.linear(_router_input(hidden, self.jitter, self.training), self.weight.float())  # [T, E]
        probs = logits.softmax(dim=-1)
        return Scores(logits, probs, probs)

    def weigh(self, scored: Scores, indices: torch.Tensor) -> RouterOutput:
        """Each chosen expert's probability."""
        return RouterOutput(scored.scores.gather(1, indices), indices, scored.scores, scored.logits)

    def aux_loss(self, scored: Scores, out: RouterOutput) -> torch.Tensor:
        """alpha * E * sum_i f_i P_i over first choices, plus the z-loss."""
        return self.aux_coef * switch_balance_loss(scored.scores, out.indices[:, 0]) + _z_loss(scored.logits,
                                                                                               self.z_coef)


class GShardRouter(SwitchRouter):
    """GShard's top-2 router with the random second-expert policy."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.threshold = config.second_expert_threshold

    def weigh(self, scored: Scores, indices: torch.Tensor) -> RouterOutput:
        """The chosen probabilities normalized to sum to 1; in training the second expert is kept with probability
        min(1, g2 / threshold), a dropped one keeps its index with weight 0."""
        top = scored.scores.gather(1, indices)  # [T, k], first choice first
        weights = top / (top.sum(dim=-1, keepdim=True) + 1e-9)
        out = RouterOutput(weights, indices, scored.scores, scored.logits)
        if self.training and indices.shape[1] > 1:
            with torch.no_grad():
                second = torch.rand_like(weights[:, 1]) < weights[:, 1] / self.threshold  # [T]
                out.kept = torch.ones_like(weights, dtype=torch.bool)
                out.kept[:, 1] = second
            out.weights = weights * out.kept
        return out


@dataclass
class NoisyScores(Scores):
    """Noisy top-k's scoring: `ranking` holds the noisy logits, `std` [T, E] the noise scale (None in evaluation)."""

    std: torch.Tensor | None = None


class NoisyTopKRouter(_LearnedGate):
    """Shazeer et al.'s noisy top-k gating: G(x) = Softmax(KeepTopK(x W_g + N(0, 1) * Softplus(x W_noise), k))."""

    noise_epsilon = 1e-2  # a floor on the noise scale, as in the reference implementation

    def __init__(self, config: ModelConfig):
        super().__init__(config)  # weight: W_g
        self.noise_weight = nn.Parameter(torch.empty(self.n_experts, config.hidden_size))  # W_noise

    @torch.no_grad()
    def reset_parameters(self, std: float) -> None:
        """Zeros for W_g and W_noise (the paper's initialization: no signal, some noise, balanced loads)."""
        self.weight.zero_()
        self.noise_weight.zero_()

    def noise_scale(self, x: torch.Tensor) -> torch.Tensor:
        """The learned noise standard deviation Softplus(x W_noise) + epsilon, x [T, hidden] fp32 -> [T, E]."""
        return F.softplus(F.linear(x, self.noise_weight.float())) + self.noise_epsilon

    def score(self, hidden: torch.Tensor, token_ids: torch.Tensor | None) -> NoisyScores:
        """Clean logits x W_g, and in training the noisy ones the choice ranks (noise drawn once a forward)."""
        xf = _router_input(hidden, self.jitter, self.training)
        clean = F.linear(xf, self.weight.float())  # [T, E]
        if not self.training:
            return NoisyScores(clean, clean, clean)
        std = self.noise_scale(xf)
        return NoisyScores(clean, clean, clean + torch.randn_like(clean) * std, std)

    def weigh(self, scored: NoisyScores, indices: torch.Tensor) -> RouterOutput:
        """Softmax over the chosen experts' noisy logits; `scores` are the gates G(x) [T, E] (zero off the choice)."""
        weights = scored.ranking.gather(1, indices).softmax(dim=-1)  # keep the top k, then softmax
        gates = torch.zeros_like(scored.logits).scatter(1, indices, weights)  # [T, E] G(x)
        return RouterOutput(weights, indices, gates, scored.logits)

    def aux_loss(self, scored: NoisyScores, out: RouterOutput) -> torch.Tensor:
        """alpha * (CV(importance)^2 + CV(load)^2) plus the z-loss."""
        k = out.indices.shape[1]
        top = scored.ranking.topk(k + 1, dim=-1).values  # [T, k + 1]
        importance = out.scores.sum(dim=0)  # [E]
        load = self._load(scored.logits, scored.ranking, scored.std, top, k).sum(dim=0)  # [E]
        return self.aux_coef * (_cv_squared(importance) + _cv_squared(load)) + _z_loss(scored.logits, self.z_coef)

    @staticmethod
    def _load(clean: torch.Tensor, noisy: torch.Tensor, std: torch.Tensor, top: torch.Tensor, k: int) -> torch.Tensor:
        """P(x, i) [T, E]: the probability, over a fresh draw of expert i's noise, that i is still in the top k
        (the paper's smooth load estimator): Phi((clean_i - kth_excluding(noisy, k, i)) / std_i)."""
        threshold_if_in = top[:, k:k + 1]  # [T, 1] the (k+1)-th noisy logit: what i must beat if it is in
        threshold_if_out = top[:, k - 1:k]  # [T, 1] the k-th: what i must beat if it is out
        normal = torch.distributions.Normal(torch.zeros((), device=clean.device), torch.ones((), device=clean.device))
        p_in = normal.cdf((clean - threshold_if_in) / std)
        p_out = normal.cdf((clean - threshold_if_out) / std)
        return torch.where(noisy > threshold_if_in, p_in, p_out)


class HashRouter(Router):
    """Hash layers: expert = table[token id], a fixed random assignment balanced over the vocabulary (every expert
    gets vocab_size / E token ids, to within one). Nothing is learned; the table is saved as a buffer."""

    ranks_experts = False

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = config.n_routed_experts, config.num_experts_per_tok
        self.register_buffer("expert_of_token", torch.empty(config.vocab_size, dtype=torch.long))

    @torch.no_grad()
    def reset_parameters(self, std: float) -> None:
        """The fixed table: a seeded permutation of the vocabulary dealt round-robin to the experts."""
        vocab = self.expert_of_token.shape[0]
        perm = torch.randperm(vocab, generator=torch.Generator().manual_seed(HASH_SEED))
        table = torch.empty(vocab, dtype=torch.long)
        table[perm] = torch.arange(vocab) % self.n_experts
        self.expert_of_token.copy_(table)

    def score(self, hidden: torch.Tensor, token_ids: torch.Tensor | None) -> Scores:
        """No scores: zero logits and affinities, no ranking (the table decides)."""
        if token_ids is None:
            raise ValueError("router_type='hash' routes by token id: the MoE layer needs token_ids (the model "
                             "passes its input_ids; call MoE(x, token_ids=...) when using a layer on its own)")
        if token_ids.numel() != hidden.shape[0]:
            raise ValueError(f"hash routing got {token_ids.numel()} token ids for {hidden.shape[0]} tokens")
        zeros = torch.zeros(hidden.shape[0], self.n_experts, device=hidden.device)
        return Scores(zeros, zeros, None)

    def select(self, scored: Scores, ranking: torch.Tensor | None, k: int,
               token_ids: torch.Tensor | None) -> torch.Tensor:
        """table[token_ids] -> [T, 1]."""
        return self.expert_of_token[token_ids.reshape(-1)].unsqueeze(1)

    def weigh(self, scored: Scores, indices: torch.Tensor) -> RouterOutput:
        """Weight 1 for the expert used; `scores` one-hot on it [T, E]."""
        weights = torch.ones(indices.shape, dtype=torch.float32, device=indices.device)
        scores = torch.zeros_like(scored.scores).scatter_(1, indices, 1.0)  # [T, E]
        return RouterOutput(weights, indices, scores, scored.logits)


@dataclass
class HierarchicalScores(Scores):
    """The two-level gate's scoring: `logits`/`ranking` are the secondary gates [T, E], `primary_logits` [T, G]."""

    primary_logits: torch.Tensor | None = None


class HierarchicalRouter(_LearnedGate):
    """A two-level gate: primary softmax over the kept top-`topk_group` of `n_group` group logits, times a
    secondary softmax over the kept top-b expert logits inside each chosen group (b = num_experts_per_tok /
    topk_group). `weight` [n_group, hidden] is the primary gate, `group_weight` [E, hidden] the secondary gates,
    group g owning rows g * E/n_group ... (g + 1) * E/n_group - 1. Indices come groups-major: the b experts of the
    first chosen group, then those of the second, ..."""

    def __init__(self, config: ModelConfig):
        super().__init__(config, rows=config.n_group)  # weight: the primary gate
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.group_weight = nn.Parameter(torch.empty(self.n_experts, config.hidden_size))

    @torch.no_grad()
    def reset_parameters(self, std: float) -> None:
        """Normal(0, std) gate weights."""
        self.weight.normal_(0.0, std)
        self.group_weight.normal_(0.0, std)

    def score(self, hidden: torch.Tensor, token_ids: torch.Tensor | None) -> HierarchicalScores:
        """Primary [T, G] and secondary [T, E] logits (the secondary ones rank experts inside a group)."""
        xf = _router_input(hidden, self.jitter, self.training)
        primary = F.linear(xf, self.weight.float())  # [T, G]
        secondary = F.linear(xf, self.group_weight.float())  # [T, E]
        return HierarchicalScores(secondary, secondary, secondary, primary)

    def select(self, scored: HierarchicalScores, ranking: torch.Tensor, k: int,
               token_ids: torch.Tensor | None) -> torch.Tensor:
        """The topk_group best groups by the primary gate, then k / topk_group experts inside each."""
        T, G, per = ranking.shape[0], self.n_group, self.n_experts // self.n_group
        groups = scored.primary_logits.detach().topk(self.topk_group, dim=-1).indices  # [T, a]
        chosen = ranking.view(T, G, per).gather(1, groups.unsqueeze(-1).expand(-1, -1, per))  # [T, a, per]
        inner = chosen.topk(k // self.topk_group, dim=-1).indices  # [T, a, b]
        return (groups.unsqueeze(-1) * per + inner).reshape(T, -1)

    def weigh(self, scored: HierarchicalScores, indices: torch.Tensor) -> RouterOutput:
        """Primary softmax over the groups used times the secondary softmax over the experts used in each."""
        T, a, per = indices.shape[0], self.topk_group, self.n_experts // self.n_group
        inner = indices.view(T, a, -1)  # [T, a, b]
        primary = scored.primary_logits.gather(1, inner[..., 0] // per).softmax(dim=-1)  # [T, a]
        secondary = scored.logits.gather(1, indices).view(T, a, -1).softmax(dim=-1)  # [T, a, b]
        weights = (primary.unsqueeze(-1) * secondary).reshape(T, -1)  # [T, a * b]
        gates = torch.zeros_like(scored.logits).scatter(1, indices, weights)  # [T, E]
        return RouterOutput(weights, indices, gates, scored.logits)

    def aux_loss(self, scored: HierarchicalScores, out: RouterOutput) -> torch.Tensor:
        """alpha * (CV^2 of group importance + CV^2 of expert importance) plus both z-losses."""
        T, a, per = out.indices.shape[0], self.topk_group, self.n_experts // self.n_group
        groups = out.indices.view(T, a, -1)[..., 0] // per  # [T, a]
        primary = scored.primary_logits.gather(1, groups).softmax(dim=-1)
        group_gates = torch.zeros_like(scored.primary_logits).scatter(1, groups, primary)  # [T, G]
        return (self.aux_coef * (_cv_squared(group_gates.sum(0)) + _cv_squared(out.scores.sum(0)))
                + _z_loss(scored.primary_logits, self.z_coef) + _z_loss(scored.logits, self.z_coef))

    def reachable_experts(self) -> int:
        """The experts of the topk_group groups the primary gate keeps."""
        return self.topk_group * (self.n_experts // self.n_group)

    def hook_problem(self, hook: RoutingHook) -> str | None:
        """top_k must give every chosen group the same number of experts; skip_top has no ranking across groups."""
        if hook.skip_top:
            return (f"top_k={self.top_k if hook.top_k is None else hook.top_k} with skip_top={hook.skip_top}: the "
                    f"hierarchical router ranks experts only inside a group, so there are no best experts to skip")
        if hook.top_k is not None and hook.top_k % self.topk_group:
            return (f"top_k={hook.top_k} with skip_top=0: expected a multiple of topk_group={self.topk_group} (the "
                    f"hierarchical router takes as many experts from each chosen group)")
        return super().hook_problem(hook)
