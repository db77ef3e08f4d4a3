"""What experts are for: domain specialization (each expert's share of each --data source, against uniform and
against the pooled load, as in the OLMoE and Mixtral routing analyses) and vocabulary specialization (the tokens each
expert receives most, and how concentrated each token's routing is)."""

from __future__ import annotations

import torch

from .capture import LayerRouting

DEFINITIONS = {
    "domain_share": "share_d,i = tokens of source d routed to expert i / tokens of source d; k/E for uniform "
                    "routing (OLMoE's domain specialization)",
    "domain_ratio": "share_d,i / (k/E): 1 = the expert gets its uniform share of source d",
    "domain_tv_uniform": "0.5 * sum_i |p_d,i - 1/E|, p_d = source d's load over the experts (sums to 1): 0 = "
                         "uniform, 1 - 1/E at most",
    "domain_tv_pooled": "0.5 * sum_i |p_d,i - p_i|, p = the load of all sources pooled: how differently source d "
                        "routes from the rest, imbalance shared by all sources left out",
    "expert_top_tokens": "the token ids expert i receives most; 'of expert' = their share of the expert's tokens, "
                         "'of token' = share of that token's occurrences routed to expert i (k/E at random)",
    "token_concentration": "for a token id v seen n_v times, max_i count(v, i) / n_v: the share of its occurrences "
                           "whose top-k holds its most frequent expert (k/E at random, 1 = always the same expert); "
                           "the layer figure is its occurrence-weighted mean over tokens seen >= min_count times",
}


def domain_specialization(layer: LayerRouting, source: torch.Tensor, n_sources: int, n_experts: int) -> dict:
    """Per source: its share of each expert, that share over uniform, and its TV distance from uniform and from the
    pooled load. source [N] long: which --data source each token came from."""
    k = layer.indices.shape[1]
    slot_source = source.long()[:, None].expand_as(layer.indices).reshape(-1)
    counts = torch.bincount(slot_source * n_experts + layer.indices.reshape(-1).long(),
                            minlength=n_sources * n_experts).view(n_sources, n_experts).double()  # [D, E]
    tokens = torch.bincount(source.long(), minlength=n_sources).double().clamp_min(1)  # [D]
    share = counts / tokens[:, None]  # [D, E]
    p = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
    pooled = counts.sum(dim=0) / counts.sum().clamp_min(1)
    return {"share": share.tolist(), "ratio": (share / (k / n_experts)).tolist(),
            "tv_uniform": (0.5 * (p - 1 / n_experts).abs().sum(dim=1)).tolist(),
            "tv_pooled": (0.5 * (p - pooled).abs().sum(dim=1)).tolist()}


def _token_expert_counts(layer: LayerRouting, token_ids: torch.Tensor,
                         n_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token id, expert, count) of every pair that occurred: a sparse [vocab, E] table (the dense one would be
    vocab x E, 26M entries for DeepSeek-V3)."""
    slot_token = token_ids.long()[:, None].expand_as(layer.indices).reshape(-1)
    keys, counts = torch.unique(slot_token * n_experts + layer.indices.reshape(-1).long(), return_counts=True)
    return keys // n_experts, keys % n_experts, counts


def vocabulary_specialization(layer: LayerRouting, token_ids: torch.Tensor, n_experts: int, top_n: int = 8,
                              min_count: int = 5) -> dict:
    """Per expert its `top_n` most received tokens; per token id seen >= min_count times its routing concentration
    ([token, occurrences, concentration], most concentrated first); the layer's occurrence-weighted mean
    concentration, and the `top_n` most and least concentrated tokens."""
    token, expert, count = _token_expert_counts(layer, token_ids, n_experts)
    ids, occurrences = torch.unique(token_ids.long(), return_counts=True)
    seen = dict(zip(ids.tolist(), occurrences.tolist()))
    per_expert_total = torch.bincount(expert, weights=count.double(), minlength=n_experts)
    experts = []
    for e in range(n_experts):
        mine = (expert == e).nonzero().squeeze(1)
        order = mine[count[mine].argsort(descending=True, stable=True)][:top_n]
        total = max(float(per_expert_total[e]), 1.0)
        experts.append([{"token": int(token[j]), "count": int(count[j]), "of_expert": float(count[j]) / total,
                         "of_token": float(count[j]) / seen[int(token[j])]} for j in order.tolist()])
    best = torch.zeros(int(ids.max()) + 1 if ids.numel() else 1, dtype=torch.long)
    best.scatter_reduce_(0, token, count, reduce="amax")
    frequent = [(v, n) for v, n in seen.items() if n >= min_count]
    concentration = {v: int(best[v]) / n for v, n in frequent}
    weighted = sum(concentration[v] * n for v, n in frequent) / max(sum(n for _, n in frequent), 1)
    ranked = sorted(frequent, key=lambda vn: (-concentration[vn[0]], -vn[1]))
    k = layer.indices.shape[1]

    def entry(v: int, n: int) -> dict:
        return {"token": v, "count": n, "concentration": concentration[v]}

    return {"experts": experts, "concentration_mean": weighted, "concentration_random": k / n_experts,
            "tokens_counted": len(frequent), "min_count": min_count,
            "most_concentrated": [entry(v, n) for v, n in ranked[:top_n]],
            "least_concentrated": [entry(v, n) for v, n in ranked[::-1][:top_n]],
            "concentration": [[v, n, concentration[v]] for v, n in ranked]}  # every token seen >= min_count times
