"""Routers of the MoE literature, for comparison with DeepSeek's (`router_type` in ModelConfig), and expert capacity.

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

Every router computes in fp32 (as DeepSeek's does), returns a RouterOutput, takes the flattened token ids (only hash
routing reads them) and, in training, puts its weighted balance loss (plus the router z-loss) in `aux_loss`. They
keep `mlp.gate.weight` [E, hidden] where they have one, so checkpoints keep the Hugging Face layout; their config.json
says `model_type: seekmoe_<router_type>`, which transformers does not know and so refuses to load.

`limit_capacity` is the token dropping of Switch and GShard, for every router including DeepSeek's: each expert takes
at most ceil(capacity_factor * tokens * top_k / E) slots of the batch, first choices before second ones, earlier
tokens first; a dropped slot gets weight 0 (no output, no gradient) and its token passes through the residual.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .router import RouterOutput

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


class SwitchRouter(nn.Module):
    """Switch Transformer's top-1 router."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_experts = config.n_routed_experts
        self.jitter = config.router_jitter
        self.aux_coef = config.router_aux_loss()
        self.z_coef = config.router_z_loss_coef
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.hidden_size))

    @torch.no_grad()
    def reset_parameters(self, std: float) -> None:
        """Normal(0, std) router weights."""
        self.weight.normal_(0.0, std)

    def update_bias(self, expert_counts: torch.Tensor, speed: float) -> None:
        """No selection bias: auxiliary-loss-free balancing is DeepSeek's."""

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> RouterOutput:
        """x [T, hidden] -> weights/indices [T, 1]."""
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(_router_input(x, self.jitter, self.training), self.weight.float())  # [T, E]
            probs = logits.softmax(dim=-1)
            weights, indices = probs.max(dim=-1, keepdim=True)  # [T, 1]
            out = RouterOutput(weights, indices, probs, logits)
            if self.training:
                out.aux_loss = (self.aux_coef * switch_balance_loss(probs, indices[:, 0])
                                + _z_loss(logits, self.z_coef))
            return out


class GShardRouter(SwitchRouter):
    """GShard's top-2 router with the random second-expert policy."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.threshold = config.second_expert_threshold

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> RouterOutput:
        """x [T, hidden] -> weights/indices [T, 2], weights g1, g2 normalized to sum to 1."""
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(_router_input(x, self.jitter, self.training), self.weight.float())  # [T, E]
            probs = logits.softmax(dim=-1)
            top, indices = probs.topk(2, dim=-1)  # [T, 2], first choice first
            weights = top / (top.sum(dim=-1, keepdim=True) + 1e-9)
            out = RouterOutput(weights, indices, probs, logits)
            if self.training:
                with torch.no_grad():
                    second = torch.rand_like(weights[:, 1]) < weights[:, 1] / self.threshold  # [T]
                    out.kept = torch.stack([torch.ones_like(second), second], dim=-1)
                out.weights = weights * out.kept
                out.aux_loss = (self.aux_coef * switch_balance_loss(probs, indices[:, 0])
                                + _z_loss(logits, self.z_coef))
            return out


class NoisyTopKRouter(nn.Module):
    """Shazeer et al.'s noisy top-k gating: G(x) = Softmax(KeepTopK(x W_g + N(0, 1) * Softplus(x W_noise), k))."""

    noise_epsilon = 1e-2  # a floor on the noise scale, as in the reference implementation

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = config.n_routed_experts, config.num_experts_per_tok
        self.jitter = config.router_jitter
        self.aux_coef = config.router_aux_loss()
        self.z_coef = config.router_z_loss_coef
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.hidden_size))  # W_g
        self.noise_weight = nn.Parameter(torch.empty(self.n_experts, config.hidden_size))  # W_noise

    @torch.no_grad()
    def reset_parameters(self, std: float) -> None:
        """Zeros for W_g and W_noise (the paper's initialization: no signal, some noise, balanced loads)."""
        self.weight.zero_()
        self.noise_weight.zero_()

    def update_bias(self, expert_counts: torch.Tensor, speed: float) -> None:
        """No selection bias: auxiliary-loss-free balancing is DeepSeek's."""

    def noise_scale(self, x: torch.Tensor) -> torch.Tensor:
        """The learned noise standard deviation Softplus(x W_noise) + epsilon, x [T, hidden] fp32 -> [T, E]."""
        return F.softplus(F.linear(x, self.noise_weight.float())) + self.noise_epsilon

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> RouterOutput:
        """x [T, hidden] -> weights/indices [T, k]; noise only in training."""
        k = self.top_k
        with torch.autocast(x.device.type, enabled=False):
            xf = _router_input(x, self.jitter, self.training)
            clean = F.linear(xf, self.weight.float())  # [T, E]
            if self.training:
                std = self.noise_scale(xf)
                noisy = clean + torch.randn_like(clean) * std
            else:
                noisy = clean
            top, top_idx = noisy.topk(k + 1 if self.training else k, dim=-1)  # [T, k(+1)]
            indices = top_idx[:, :k]
            weights = top[:, :k].softmax(dim=-1)  # keep the top k, then softmax
            gates = torch.zeros_like(clean).scatter(1, indices, weights)  # [T, E] G(x)
            out = RouterOutput(weights, indices, gates, clean)
            if self.training:
                importance = gates.sum(dim=0)  # [E]
                load = self._load(clean, noisy, std, top, k).sum(dim=0)  # [E]
                out.aux_loss = self.aux_coef * (_cv_squared(importance) + _cv_squared(load)) + _z_loss(clean, self.z_coef)
            return out

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


class HashRouter(nn.Module):
    """Hash layers: expert = table[token id], a fixed random assignment balanced over the vocabulary (every expert
    gets vocab_size / E token ids, to within one). Nothing is learned; the table is saved as a buffer."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_experts = config.n_routed_experts
        self.register_buffer("expert_of_token", torch.empty(config.vocab_size, dtype=torch.long))

    @torch.no_grad()
    def reset_parameters(self, std: float) -> None:
        """The fixed table: a seeded permutation of the vocabulary dealt round-robin to the experts."""
        vocab = self.expert_of_token.shape[0]
        perm = torch.randperm(vocab, generator=torch.Generator().manual_seed(HASH_SEED))
        table = torch.empty(vocab, dtype=torch.long)
        table[perm] = torch.arange(vocab) % self.n_experts
        self.expert_of_token.copy_(table)

    def update_bias(self, expert_counts: torch.Tensor, speed: float) -> None:
        """No selection bias: nothing to balance."""

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> RouterOutput:
        """x [T, hidden], token_ids [T] -> indices [T, 1] = table[token_ids], weights 1."""
        if token_ids is None:
            raise ValueError("router_type='hash' routes by token id: the MoE layer needs token_ids (the model "
                             "passes its input_ids; call MoE(x, token_ids=...) when using a layer on its own)")
        if token_ids.numel() != x.shape[0]:
            raise ValueError(f"hash routing got {token_ids.numel()} token ids for {x.shape[0]} tokens")
        indices = self.expert_of_token[token_ids.reshape(-1)].unsqueeze(1)  # [T, 1]
        weights = torch.ones(indices.shape, dtype=torch.float32, device=x.device)
        scores = torch.zeros(indices.shape[0], self.n_experts, device=x.device).scatter_(1, indices, 1.0)  # [T, E]
        return RouterOutput(weights, indices, scores, torch.zeros_like(scores))


class HierarchicalRouter(nn.Module):
    """A two-level gate: primary softmax over the kept top-`topk_group` of `n_group` group logits, times a
    secondary softmax over the kept top-b expert logits inside each chosen group (b = num_experts_per_tok /
    topk_group). `weight` [n_group, hidden] is the primary gate, `group_weight` [E, hidden] the secondary gates,
    group g owning rows g * E/n_group ... (g + 1) * E/n_group - 1."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_experts, self.n_group, self.topk_group = config.n_routed_experts, config.n_group, config.topk_group
        self.per_group_k = config.num_experts_per_tok // config.topk_group
        self.jitter = config.router_jitter
        self.aux_coef = config.router_aux_loss()
        self.z_coef = config.router_z_loss_coef
        self.weight = nn.Parameter(torch.empty(self.n_group, config.hidden_size))
        self.group_weight = nn.Parameter(torch.empty(self.n_experts, config.hidden_size))

    @torch.no_grad()
    def reset_parameters(self, std: float) -> None:
        """Normal(0, std) gate weights."""
        self.weight.normal_(0.0, std)
        self.group_weight.normal_(0.0, std)

    def update_bias(self, expert_counts: torch.Tensor, speed: float) -> None:
        """No selection bias: auxiliary-loss-free balancing is DeepSeek's."""

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> RouterOutput:
        """x [T, hidden] -> weights/indices [T, topk_group * b], the experts of each chosen group together."""
        T, G, per = x.shape[0], self.n_group, self.n_experts // self.n_group
        with torch.autocast(x.device.type, enabled=False):
            xf = _router_input(x, self.jitter, self.training)
            primary_logits = F.linear(xf, self.weight.float())  # [T, G]
            top_g, groups = primary_logits.topk(self.topk_group, dim=-1)  # [T, a]
            primary = top_g.softmax(dim=-1)  # [T, a]
            secondary_logits = F.linear(xf, self.group_weight.float())  # [T, E]
            chosen = secondary_logits.view(T, G, per).gather(1, groups.unsqueeze(-1).expand(-1, -1, per))  # [T,a,per]
            top_e, inner = chosen.topk(self.per_group_k, dim=-1)  # [T, a, b]
            weights = (primary.unsqueeze(-1) * top_e.softmax(dim=-1)).reshape(T, -1)  # [T, a * b]
            indices = (groups.unsqueeze(-1) * per + inner).reshape(T, -1)
            gates = torch.zeros_like(secondary_logits).scatter(1, indices, weights)  # [T, E]
            out = RouterOutput(weights, indices, gates, secondary_logits)
            if self.training:
                group_gates = torch.zeros_like(primary_logits).scatter(1, groups, primary)  # [T, G]
                out.aux_loss = (self.aux_coef * (_cv_squared(group_gates.sum(0)) + _cv_squared(gates.sum(0)))
                                + _z_loss(primary_logits, self.z_coef) + _z_loss(secondary_logits, self.z_coef))
            return out


LITERATURE_ROUTERS = {"switch": SwitchRouter, "gshard": GShardRouter, "noisy_topk": NoisyTopKRouter,
                      "hash": HashRouter, "hierarchical": HierarchicalRouter}


def build_router(config: ModelConfig) -> nn.Module:
    """The router `config.router_type` names, other than DeepSeek's."""
    if config.router_type not in LITERATURE_ROUTERS:
        raise ValueError(f"router_type={config.router_type!r} has no literature router: expected one of "
                         f"{sorted(LITERATURE_ROUTERS)}")
    return LITERATURE_ROUTERS[config.router_type](config)


def limit_capacity(route: RouterOutput, capacity_factor: float,
                   n_experts: int) -> tuple[RouterOutput, torch.Tensor, torch.Tensor]:
    """Drop the slots beyond each expert's capacity ceil(capacity_factor * T * top_k / E): (the route with those
    slots' weights zeroed and `kept` false, slots each expert was routed before dropping [E], dropped slots []).

    Slots are served in order of choice (every token's first expert before any second one, as in GShard), then of
    token; slots the router itself did not keep (`route.kept`) take no capacity. No host synchronization.
    """
    T, k = route.indices.shape
    capacity = math.ceil(capacity_factor * T * k / n_experts)
    used = (torch.ones_like(route.indices, dtype=torch.bool) if route.kept is None else route.kept).t().reshape(-1)
    expert = torch.where(used, route.indices.t().reshape(-1), n_experts)  # [k*T] choice-major; unused -> E
    order = expert.argsort(stable=True)
    # scatter_add, not bincount: bincount learns its output size from the data, a host synchronization on a GPU
    counts = torch.zeros(n_experts + 1, dtype=torch.long, device=expert.device).scatter_add_(
        0, expert, torch.ones_like(expert))  # [E + 1]
    starts = counts.cumsum(0) - counts
    rank = torch.empty_like(expert)
    rank[order] = torch.arange(expert.numel(), device=expert.device) - starts[expert[order]]
    keep = used & (rank < capacity)  # [k*T]
    kept = keep.view(k, T).t()  # [T, k]
    dropped = (used & ~keep).sum()
    out = RouterOutput(route.weights * kept, route.indices, route.scores, route.logits, kept, route.aux_loss)
    return out, counts[:n_experts], dropped
