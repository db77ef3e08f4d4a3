"""Routing statistics of one MoE layer over N tokens: expert load, MaxVio, entropy, dropped slots, co-activation,
consecutive-token agreement, the shared experts' share of the output norm, and router saturation between two
checkpoints. Each function takes `LayerRouting` records (capture.py) and returns plain numbers and lists, ready for
JSON; the definitions the report prints next to them are in `DEFINITIONS`."""

from __future__ import annotations

import math

import torch

from ..train.balance import max_violation
from .capture import LayerRouting

DEFINITIONS = {
    "load": "load_i = share of all routed slots (N tokens x k) that went to expert i; 1/E when balanced",
    "max_vio": "MaxVio = (max_i count_i - mean count) / mean count (DeepSeek-V3); 0 when balanced",
    "routing_entropy": "mean over tokens of H(s_t) = -sum_i p_ti ln p_ti, p_t = the token's router affinities "
                       "normalized to sum 1 (nats; ln E = no preference, 0 = one expert)",
    "load_entropy": "H(load) / ln E: 1 when every expert gets the same share, 0 when one expert gets all",
    "dropped_share": "share of routed slots dropped by a capacity limit (they pass through the residual); "
                     "0 for dropless routing",
    "coactivation": "P(j | i) = tokens routed to both i and j / tokens routed to i (OLMoE); a pair's rate = tokens "
                    "routed to both / N, k(k-1)/(E(E-1)) for uniform random routing",
    "consecutive_top1": "share of adjacent token pairs (t, t+1) of one sequence whose highest-weight expert is "
                        "the same (Mixtral); 1/E for random routing",
    "consecutive_overlap": "mean over adjacent pairs of |topk_t & topk_t+1| / k; k/E for random routing",
    "shared_norm_share": "sum_t ||shared(x_t)|| / (sum_t ||shared(x_t)|| + sum_t ||routed(x_t)||), "
                         "routed(x_t) = sum_i g_ti Expert_i(x_t)",
    "saturation": "router saturation (OLMoE): mean over tokens of |topk_t(compared checkpoint) & topk_t(this "
                  "model)| / k, on the same tokens; 1 = the compared checkpoint already routes as the final model",
}


def expert_hits(indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Which experts each token chose: indices [N, k] -> bool [N, E]."""
    return torch.zeros(indices.shape[0], n_experts, dtype=torch.bool).scatter_(1, indices.long(), True)


def expert_counts(layer: LayerRouting, n_experts: int) -> torch.Tensor:
    """Tokens routed to each expert -> [E] long."""
    return torch.bincount(layer.indices.reshape(-1).long(), minlength=n_experts)


def top1(layer: LayerRouting) -> torch.Tensor:
    """Each token's highest-weight expert -> [N] long."""
    return layer.indices.gather(1, layer.weights.argmax(dim=1, keepdim=True)).squeeze(1).long()


def load_statistics(layer: LayerRouting, n_experts: int) -> dict:
    """Load share per expert, MaxVio, mean routing entropy, load entropy and dropped share of one layer."""
    counts = expert_counts(layer, n_experts)
    slots = max(int(counts.sum()), 1)
    load = counts.double() / slots
    positive = load[load > 0]
    load_entropy = float(-(positive * positive.log()).sum()) / math.log(n_experts) if n_experts > 1 else 1.0
    return {"tokens": int(layer.indices.shape[0]), "counts": counts.tolist(), "load": load.tolist(),
            "max_vio": float(max_violation(counts[None])[0]),
            "routing_entropy": float(layer.entropy.double().mean()) if layer.entropy.numel() else 0.0,
            "routing_entropy_max": math.log(n_experts), "load_entropy": load_entropy,
            "dropped_share": layer.dropped_slots / slots}


def coactivation(layer: LayerRouting, n_experts: int, top_pairs: int = 10) -> dict:
    """P(j | i) [E, E] (diagonal 0), each pair's rate, and the `top_pairs` pairs chosen together most often."""
    hits = expert_hits(layer.indices, n_experts).double()  # [N, E]
    together = hits.T @ hits  # [E, E] tokens routed to both i and j
    alone = together.diagonal().clone()
    conditional = together / alone.clamp_min(1)[:, None]
    conditional.fill_diagonal_(0)
    n, k = max(hits.shape[0], 1), layer.indices.shape[1]
    pairs = [(int(i), int(j), float(together[i, j]) / n) for i in range(n_experts) for j in range(i + 1, n_experts)]
    pairs.sort(key=lambda p: -p[2])
    return {"conditional": conditional.tolist(),
            "top_pairs": [{"experts": [i, j], "rate": r} for i, j, r in pairs[:top_pairs]],
            "random_pair_rate": k * (k - 1) / (n_experts * (n_experts - 1)) if n_experts > 1 else 0.0}


def consecutive(layer: LayerRouting, next_in_sequence: torch.Tensor, n_experts: int) -> dict:
    """How often token t+1 keeps token t's experts, over pairs inside one sequence (next_in_sequence [N] bool: token
    t+1 follows t in the same sequence)."""
    pairs = next_in_sequence[:-1].nonzero().squeeze(1)  # [P] positions t with a successor
    k = layer.indices.shape[1]
    if pairs.numel() == 0:
        return {"pairs": 0, "top1_same": 0.0, "topk_overlap": 0.0, "top1_random": 1 / n_experts,
                "topk_random": k / n_experts}
    first = top1(layer)
    hits = expert_hits(layer.indices, n_experts)
    overlap = (hits[pairs] & hits[pairs + 1]).sum(dim=1).double() / k
    return {"pairs": int(pairs.numel()), "top1_same": float((first[pairs] == first[pairs + 1]).double().mean()),
            "topk_overlap": float(overlap.mean()), "top1_random": 1 / n_experts, "topk_random": k / n_experts}


def norm_share(layer: LayerRouting) -> dict:
    """The shared and routed experts' mean output norms and the shared experts' share of their sum."""
    shared, routed = float(layer.shared_norm.double().sum()), float(layer.routed_norm.double().sum())
    n = max(layer.shared_norm.numel(), 1)
    return {"shared_norm_mean": shared / n, "routed_norm_mean": routed / n,
            "shared_norm_share": shared / (shared + routed) if shared + routed > 0 else 0.0}


def saturation(compared: LayerRouting, final: LayerRouting, n_experts: int) -> float:
    """Mean over tokens of |topk(compared) & topk(final)| / k, k of the final model (same tokens, same order)."""
    if compared.indices.shape[0] != final.indices.shape[0]:
        raise ValueError(f"saturation needs the same tokens: {compared.indices.shape[0]} routed by the compared "
                         f"checkpoint, {final.indices.shape[0]} by the model")
    if final.indices.shape[0] == 0:
        return 0.0
    common = expert_hits(compared.indices, n_experts) & expert_hits(final.indices, n_experts)
    return float(common.sum(dim=1).double().mean()) / final.indices.shape[1]


def layer_statistics(layer: LayerRouting, next_in_sequence: torch.Tensor, n_experts: int) -> dict:
    """Every single-model statistic of one layer, as one JSON-ready dict."""
    return {"layer": layer.layer, **load_statistics(layer, n_experts), **norm_share(layer),
            "coactivation": coactivation(layer, n_experts), "consecutive": consecutive(layer, next_in_sequence,
                                                                                       n_experts)}
