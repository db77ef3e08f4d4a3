"""The one interface every router has: `router(hidden, token_ids) -> RouterOutput`, and the hook that steers it.

The MoE layer (model/moe.py), the trainer's balancing (train/balance.py), routing replay (posttrain/routing_replay.py)
and the analysis probes (analysis/probes.py) rely on this module only, never on a router's type. A router says what
it provides through attributes, not through its class:
- `uses_balance_losses`: the MoE layer computes DeepSeek's balance losses (sequence-wise alpha, z-loss, expert- and
  device-level) from its `scores` and `logits`; routers with a loss of their own return it as `aux_loss` instead;
- `uses_bias_balancing`: it has a selection bias the trainer moves after each optimizer step with `update_bias`;
- `ranks_experts`: its choice is a top-k of one ranking of the experts, so `skip_top` and `top_k` probes apply.

A router is three steps, run by `Router.forward` in fp32 whatever the autocast state: `score` (logits, affinities,
and the ranking the choice is made from), `select` (top-k of the ranking under the router's own constraints: groups,
two levels, a table) and `weigh` (the gate weights of the chosen experts, computed from this forward's scores the way
the router weighs its choice). A `RoutingHook` acts between them, the same way for every router: it masks the best
experts of the ranking, changes k, or replaces the chosen experts (routing replay) — the weights are still this
router's weighing of the experts used, so the router keeps its gradient. Callers route by calling the module,
`router(hidden, token_ids)`, not a method: forward hooks (routing capture, the replay recorder) and FSDP's unsharding
run around `forward`.

Routers still to come fit the same three steps. DeepSeek-V4's first layers route by a fixed hash of the token id (a
`select` that reads `token_ids`, as `HashRouter` does, with no ranking), and its learned routers score with
`scoring_func='sqrtsoftplus'` (a `score` that returns sqrt(softplus(logits)) as affinities and ranking, with the
selection bias added to the ranking only, as `DeepSeekRouter` does for sigmoid).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class RouterOutput:
    """What one routing decision produced for T tokens."""

    weights: torch.Tensor  # [T, top_k] fp32 gate values multiplying the chosen experts' outputs
    indices: torch.Tensor  # [T, top_k] long chosen expert ids
    scores: torch.Tensor  # [T, E] fp32 affinities (softmax or sigmoid of the logits), before any bias
    logits: torch.Tensor  # [T, E] fp32 router logits
    # [T, top_k] bool: the slots that reach their expert (None = all). A dropped slot (over an expert's capacity, or
    # GShard's randomly skipped second expert) keeps its index but has weight 0: its token passes the residual.
    kept: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None  # scalar, weighted: the router's own balance loss (training; None: none)


@dataclass
class Scores:
    """A router's scoring of T tokens, before any choice (routers with more to hand on subclass it)."""

    logits: torch.Tensor  # [T, E] fp32
    scores: torch.Tensor  # [T, E] fp32 affinities the weights come from
    ranking: torch.Tensor | None  # [T, E] what the choice is a top-k of (affinity + bias, noisy logits); None: none


@dataclass
class RoutingHook:
    """Overrides of a router's choice, applied after scoring by every router alike (set with `set_routing_hook`).

    `experts` [T, k] long replaces the choice (routing replay: RL trains on the experts its rollout used; rows or
    entries of -1 are chosen as usual). `top_k` routes to that many experts instead of `num_experts_per_tok`, after
    excluding each token's `skip_top` best ones (inference-time probes, DeepSeekMoE section 4.5)."""

    experts: torch.Tensor | None = None
    top_k: int | None = None
    skip_top: int = 0


class Router(nn.Module):
    """The base of every router: `router(hidden [T, H], token_ids [T] | None) -> RouterOutput` (fp32).

    Subclasses set `top_k` and `n_experts` and implement `score`, `weigh`, `reset_parameters`, and where it differs
    from a plain top-k of the ranking, `select`; `aux_loss` where they have a loss of their own."""

    uses_balance_losses = False
    uses_bias_balancing = False
    ranks_experts = True
    top_k: int
    n_experts: int

    def __init__(self):
        super().__init__()
        self.routing_hook: RoutingHook | None = None

    def forward(self, hidden: torch.Tensor, token_ids: torch.Tensor | None = None) -> RouterOutput:
        """Route hidden [T, H]; token_ids [T] are read by routers that route by token (hash). Everything here is
        fp32 whatever the autocast state: under bf16 autocast a bf16 router picks a different expert set for a
        sizeable share of tokens (DeepSeek-V3 keeps its gating in fp32; Megatron-Core's moe_router_dtype=fp32)."""
        hook = self.routing_hook
        k = self.top_k if hook is None or hook.top_k is None else hook.top_k
        with torch.autocast(hidden.device.type, enabled=False):
            scored = self.score(hidden, token_ids)
            with torch.no_grad():
                ranking = None if scored.ranking is None else scored.ranking.detach()
                if hook is not None and hook.skip_top:
                    ranking = ranking.scatter(1, ranking.topk(hook.skip_top, dim=-1).indices, float("-inf"))
                indices = self.select(scored, ranking, k, token_ids)  # [T, k]
                if hook is not None and hook.experts is not None:
                    if hook.experts.shape != indices.shape:
                        raise ValueError(f"the routing hook holds experts of shape {tuple(hook.experts.shape)}: "
                                         f"expected {tuple(indices.shape)} for this forward's {indices.shape[0]} "
                                         f"tokens and top_k={k}")
                    # -1 in a replayed row: a token the replay has no record of, routed as usual
                    indices = torch.where(hook.experts >= 0, hook.experts, indices)
            out = self.weigh(scored, indices)
            if self.training:
                out.aux_loss = self.aux_loss(scored, out)
            return out

    def score(self, hidden: torch.Tensor, token_ids: torch.Tensor | None) -> Scores:
        """Logits, affinities and the ranking of every expert for hidden [T, H] (fp32)."""
        raise NotImplementedError

    def select(self, scored: Scores, ranking: torch.Tensor | None, k: int,
               token_ids: torch.Tensor | None) -> torch.Tensor:
        """The k chosen experts [T, k] long: by default the top k of `ranking` (first choice first)."""
        return ranking.topk(k, dim=-1).indices

    def weigh(self, scored: Scores, indices: torch.Tensor) -> RouterOutput:
        """The gate weights of the experts `indices` [T, k] (chosen or replayed), from this forward's scores."""
        raise NotImplementedError

    def aux_loss(self, scored: Scores, out: RouterOutput) -> torch.Tensor | None:
        """The router's own weighted balance loss of one training forward (None: it has none)."""
        return None

    def reset_parameters(self, std: float) -> None:
        """Initialize the router's parameters and buffers (the model's `reset_parameters` calls it)."""
        raise NotImplementedError

    def update_bias(self, expert_counts: torch.Tensor, speed: float) -> None:
        """Move the selection bias from the tokens each expert got [E] (routers with `uses_bias_balancing`)."""
        raise NotImplementedError(f"{type(self).__name__} has no selection bias to update")

    def reachable_experts(self) -> int:
        """How many experts one token can be routed to."""
        return self.n_experts

    def hook_problem(self, hook: RoutingHook) -> str | None:
        """Why this router cannot honour `hook`'s top_k / skip_top (None: it can). Replayed experts always can."""
        if hook.top_k is None and not hook.skip_top:
            return None
        k, reach = (self.top_k if hook.top_k is None else hook.top_k), self.reachable_experts()
        if not self.ranks_experts:
            return (f"top_k={k} with skip_top={hook.skip_top}: {type(self).__name__} does not rank experts (it "
                    f"routes by a fixed rule), so there are no best experts to skip and no k to change")
        if k < 1 or hook.skip_top < 0 or k + hook.skip_top > reach:
            return (f"top_k={k} with skip_top={hook.skip_top}: expected top_k >= 1 and top_k + skip_top <= {reach}, "
                    f"the experts a token can reach")
        return None

    def set_routing_hook(self, hook: RoutingHook | None) -> None:
        """Route through `hook` from the next forward on (None: route as trained); ValueError if it cannot."""
        problem = None if hook is None else self.hook_problem(hook)
        if problem is not None:
            raise ValueError(problem)
        self.routing_hook = hook
