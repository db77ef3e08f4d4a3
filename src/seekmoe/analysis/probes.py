"""Ablation probes (DeepSeekMoE section 4.5): validation loss when each token's best routed experts are disabled,
when the shared experts are switched off, and when a different number of routed experts is activated at inference.

The overrides are hooks on the model's main MoE layers, removed on exit: the top-k and excluded-best counts reach
the router as a `RoutingHook` (model/routing/interface.py), which every router that ranks its experts honours; the
shared experts' output is replaced by zeros.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from tqdm import tqdm

from ..model.routing import RoutingHook
from .capture import main_moe_layers
from .sources import Source, batches

DEFINITIONS = {
    "loss": "mean next-token cross-entropy (nats) over every predicted token of the --data sources",
    "skip_top": "disable top-r: each token's r best routed experts (as the router ranks them: affinity plus any "
                "balancing bias) are masked and the top-k are chosen among the rest (DeepSeekMoE section 4.5); "
                "loss rises the more the best experts were irreplaceable",
    "no_shared": "the shared experts' output replaced by zeros; 'no shared, k+1' also activates one more routed "
                 "expert, DeepSeekMoE's test of whether shared experts hold knowledge routed ones lack",
    "top_k": "k routed experts activated per token at inference instead of the trained num_experts_per_tok",
}


@contextmanager
def routing_override(model: nn.Module, top_k: int | None = None, skip_top: int = 0,
                     shared: bool = True) -> Iterator[None]:
    """Within the block, every main MoE layer routes to `top_k` experts (None: as trained) after masking each
    token's `skip_top` best ones, and its shared experts are off unless `shared`. Layers whose router does not rank
    experts (hash routing) keep routing by their table."""
    handles, hooked = [], []
    hook = RoutingHook(top_k=top_k, skip_top=skip_top) if top_k is not None or skip_top else None
    layers = main_moe_layers(model)
    # Hash-routed layers keep their token table; with no layer that ranks experts there is nothing to probe, and the
    # router says so (set_routing_hook raises ValueError naming the setting).
    refuse = hook is not None and layers and not any(m.gate.ranks_experts for _, m in layers)
    try:
        for _, moe in layers:
            if hook is not None and (moe.gate.ranks_experts or refuse):
                moe.gate.set_routing_hook(hook)  # ValueError naming the setting when the router cannot honour it
                hooked.append(moe.gate)
            if not shared and moe.shared_experts is not None:
                handles.append(moe.shared_experts.register_forward_hook(
                    lambda module, args, out: torch.zeros_like(out)))
        yield
    finally:
        for router in hooked:
            router.set_routing_hook(None)
        for handle in handles:
            handle.remove()


@torch.no_grad()
def evaluate_loss(model: nn.Module, sources: Sequence[Source], batch_size: int, progress: bool = False,
                  desc: str = "loss") -> float:
    """Mean next-token cross-entropy over every predicted token of `sources`, batch_size sequences a forward."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for _, ids, inputs in tqdm(batches(sources, batch_size), desc=desc, unit="batch", disable=not progress,
                               dynamic_ncols=True, leave=False):
        ids = ids.to(device)
        n = ids.shape[0] * (ids.shape[1] - 1)
        total += float(model(ids, labels=ids, **{k: v.to(device) for k, v in inputs.items()}).lm_loss) * n
        count += n
    return total / max(count, 1)


def ablation_probes(model: nn.Module, sources: Sequence[Source], batch_size: int, progress: bool = False) -> dict:
    """Validation loss as trained, with the top-r routed experts disabled (r = 1..k), without the shared experts
    (and with them off and k+1 routed), and with k = 1..min(2k, reachable) routed experts at inference."""
    moe = main_moe_layers(model)
    # the routing probes change the layers that rank experts; hash-routed ones (DeepSeek-V4's first layers) stay
    ranking = [m.gate for _, m in moe if m.gate.ranks_experts]
    router = ranking[0] if ranking else moe[0][1].gate
    out: dict = {"baseline": evaluate_loss(model, sources, batch_size, progress, "probe: as trained")}
    has_shared = moe[0][1].shared_experts is not None
    if has_shared:
        with routing_override(model, shared=False):
            out["no_shared"] = evaluate_loss(model, sources, batch_size, progress, "probe: no shared")
    k, reach = router.top_k, router.reachable_experts()
    problem = router.hook_problem(RoutingHook(top_k=k))
    if problem:  # a router that does not rank its experts (hash routing)
        out["note"] = f"routing probes skipped: {problem}"
        return out
    if len(ranking) < len(moe):
        hashed = [i for i, m in moe if not m.gate.ranks_experts]
        out["note"] = (f"routing probes change the learned layers only: hash-routed layer(s) {hashed} keep their "
                       f"token table")
    out["top_k_trained"], out["reachable_experts"] = k, reach
    out["skip_top"] = {}
    for r in range(1, k + 1):
        problem = router.hook_problem(RoutingHook(skip_top=r))
        if problem:
            if r == 1:
                out["note"] = "; ".join(filter(None, [out.get("note"), f"top-r probes skipped: {problem}"]))
            break
        with routing_override(model, skip_top=r):
            out["skip_top"][r] = evaluate_loss(model, sources, batch_size, progress, f"probe: top-{r} disabled")
    if has_shared:
        if not router.hook_problem(RoutingHook(top_k=k + 1)):
            with routing_override(model, top_k=k + 1, shared=False):
                out["no_shared_plus_one"] = evaluate_loss(model, sources, batch_size, progress,
                                                          "probe: no shared, k+1")
    out["top_k"] = {}
    for kk in range(1, min(2 * k, reach) + 1):
        if kk == k:
            out["top_k"][kk] = out["baseline"]
            continue
        if router.hook_problem(RoutingHook(top_k=kk)):  # e.g. k not a multiple of a hierarchical router's groups
            continue
        with routing_override(model, top_k=kk):
            out["top_k"][kk] = evaluate_loss(model, sources, batch_size, progress, f"probe: k={kk}")
    return out
