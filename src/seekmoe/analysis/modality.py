"""Routing per modality: how a MoE layer treats image tokens (id == the image placeholder token id, as in a
vision-language model whose image features replace those tokens' embeddings) and text tokens. Per expert its load from
each modality and a specialization score; per layer the Jensen-Shannon divergence of the two loads, MaxVio per
modality and the shared experts' share of the output per modality.

The specialization score of expert i is the normalized difference s_i = (p_image,i - p_text,i) / (p_image,i +
p_text,i), where p_m,i is expert i's share of modality m's routed slots. Shares, not counts, so the score does not move
with the ratio of image to text tokens in the data (a model seeing 5% image tokens is not called text-specialized for
that); bounded in [-1, 1] and read per expert at a glance: +1 = only image tokens reach it, -1 = only text tokens, 0 =
both modalities use it alike (0 also for an expert neither uses). One number for the layer is the Jensen-Shannon
divergence of p_image and p_text (base 2): symmetric, finite when an expert gets no tokens of one modality (KL is
not), and in [0, 1] — 0 when both modalities route alike, 1 when they use disjoint experts, as
`modality_expert_groups` routing forces.
"""

from __future__ import annotations

import torch

from ..train.balance import max_violation
from .capture import LayerRouting
from .statistics import expert_counts

MODALITIES = ("image", "text")
SPECIALIZED = 0.9  # |s_i| from which an expert counts as one modality's: that modality's share is >= 95% of the sum

DEFINITIONS = {
    "modality": "a token is an image token when its id is the image placeholder token id (media_placeholder_token_id "
                "or --modality-token-id; a vision-language model puts image features in those tokens' place), else "
                "a text token",
    "modality_load": "p_m,i = share of modality m's routed slots (its tokens x k) that went to expert i",
    "modality_specialization": "s_i = (p_image,i - p_text,i) / (p_image,i + p_text,i): +1 only image tokens reach "
                               "expert i, -1 only text tokens, 0 both alike (or neither); shares, not counts, so the "
                               "image/text token ratio of the data does not move it",
    "modality_js": "Jensen-Shannon divergence (bits) of p_image and p_text: 0 = both modalities route alike, 1 = they "
                   "use disjoint experts",
    "modality_max_vio": "MaxVio of one modality's tokens over the experts it can reach (its groups under "
                        "modality_expert_groups, else all E)",
    "modality_specialized_experts": "experts with s_i >= 0.9 (image) or <= -0.9 (text): one modality's share is at "
                                    "least 95% of p_image,i + p_text,i",
    "modality_shared_share": "shared_norm_share over one modality's tokens: sum_t ||shared(x_t)|| / (sum_t "
                             "||shared(x_t)|| + sum_t ||routed(x_t)||)",
}


def is_image_token(token_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """Which tokens are image tokens: token_ids [N] -> bool [N]."""
    return token_ids.long() == image_token_id


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> float:
    """Jensen-Shannon divergence in bits of two distributions over the same experts ([E] each, summing to 1)."""
    p, q = p.double(), q.double()
    m = 0.5 * (p + q)

    def kl(a: torch.Tensor) -> float:
        nz = a > 0
        return float((a[nz] * (a[nz] / m[nz]).log2()).sum())

    return max(0.0, 0.5 * kl(p) + 0.5 * kl(q))


def specialization_scores(p_image: torch.Tensor, p_text: torch.Tensor) -> torch.Tensor:
    """s_i = (p_image,i - p_text,i) / (p_image,i + p_text,i) per expert, 0 where neither modality reaches it."""
    total = p_image + p_text
    return torch.where(total > 0, (p_image - p_text) / total.clamp_min(1e-300), torch.zeros_like(total))


def _reachable(expert_groups: dict | None, n_experts: int, n_group: int) -> dict[str, torch.Tensor]:
    """The experts each modality can reach: bool [E] per modality (all of them without modality groups)."""
    if not expert_groups:
        return {m: torch.ones(n_experts, dtype=torch.bool) for m in MODALITIES}
    group_of = torch.arange(n_experts) // (n_experts // n_group)
    return {m: torch.isin(group_of, torch.tensor(expert_groups[m])) for m in MODALITIES}


def modality_statistics(layer: LayerRouting, image: torch.Tensor, n_experts: int, expert_groups: dict | None = None,
                        n_group: int = 1) -> dict:
    """One layer's routing split by modality (image [N] bool: which of the layer's tokens are image tokens)."""
    reach = _reachable(expert_groups, n_experts, n_group)
    masks = {"image": image, "text": ~image}
    out: dict = {"layer": layer.layer, "tokens": {}, "counts": {}, "load": {}, "max_vio": {}, "shared_norm_share": {},
                 "shared_norm_mean": {}, "routed_norm_mean": {}}
    loads = {}
    for m, mask in masks.items():
        sub = LayerRouting(layer.layer, layer.indices[mask], layer.weights[mask], layer.entropy[mask], 0,
                           layer.shared_norm[mask], layer.routed_norm[mask])
        counts = expert_counts(sub, n_experts)
        loads[m] = counts.double() / max(int(counts.sum()), 1)
        shared, routed = float(sub.shared_norm.double().sum()), float(sub.routed_norm.double().sum())
        n = int(mask.sum())
        out["tokens"][m] = n
        out["counts"][m] = counts.tolist()
        out["load"][m] = loads[m].tolist()
        out["max_vio"][m] = float(max_violation(counts[reach[m]][None])[0]) if n else 0.0
        out["shared_norm_mean"][m] = shared / max(n, 1)
        out["routed_norm_mean"][m] = routed / max(n, 1)
        out["shared_norm_share"][m] = shared / (shared + routed) if shared + routed > 0 else 0.0
    both = out["tokens"]["image"] > 0 and out["tokens"]["text"] > 0
    out["specialization"] = specialization_scores(loads["image"], loads["text"]).tolist()
    out["js_divergence"] = js_divergence(loads["image"], loads["text"]) if both else 0.0
    # experts one modality has (nearly) to itself
    s = torch.tensor(out["specialization"])
    out["specialized_experts"] = {"image": int((s >= SPECIALIZED).sum()), "text": int((s <= -SPECIALIZED).sum())}
    return out


def modality_report(layers: list[LayerRouting], token_ids: torch.Tensor, image_token_id: int, n_experts: int,
                    expert_groups: dict | None = None, n_group: int = 1, source: str = "config") -> dict:
    """Every layer's routing per modality, as the `modality` entry of analysis.json. `source` says where the image
    token id came from (the model's config or --modality-token-id)."""
    image = is_image_token(token_ids, image_token_id)
    per_layer = [modality_statistics(layer, image, n_experts, expert_groups, n_group) for layer in layers]
    js = [p["js_divergence"] for p in per_layer]
    return {"image_token_id": image_token_id, "token_id_from": source, "expert_groups": expert_groups,
            "tokens": {"image": int(image.sum()), "text": int((~image).sum())},
            "js_divergence_mean": sum(js) / len(js) if js else 0.0, "specialized_threshold": SPECIALIZED,
            "layers": per_layer}
