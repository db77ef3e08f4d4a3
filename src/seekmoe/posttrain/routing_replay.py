"""Routing replay: record which experts each token was routed to while the inference Engine sampled it, and make
the training forward use exactly those experts (Megatron-Core's `moe_enable_routing_replay`; "R3", Ma et al. 2025).

Why: a MoE policy's log-probabilities depend on a discrete choice. The engine's forwards (a latent cache, absorbed
attention, other batch shapes, later bf16) and the training forward can pick different top-k experts for the same
token, and a token routed differently is scored by a different function than the one that sampled it: the
importance ratio then measures routing noise, not policy change. Replaying the rollout's experts makes the
training forward the sampling policy's function of the weights; the gate weights still come from the training
forward's scores, so the router keeps its gradient.

`RoutingRecorder` listens to the main decoder layers' routers (forward hooks: the model is not changed) and to
the Engine's forwards (`Engine.forward_observers`, which says where each request's new tokens sit), and keeps for
every request the experts [layers, positions, top_k] of every token the engine fed. `replay_routing` sets those
experts on the main MoE layers' routers (a `RoutingHook`, model/routing/interface.py, which every router honours:
each weighs the replayed experts from its own scores as it weighs its own choice) for a training forward;
`capture_routing` records what a forward chose, to measure the mismatch rate when replay is off.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..model.moe import MoE
from ..model.routing import RoutingHook


def main_moe_layers(model: nn.Module) -> list[MoE]:
    """The MoE layers of the decoder blocks (not the MTP modules), in order."""
    return [layer.mlp for layer in model.model.layers if isinstance(layer.mlp, MoE)]


class RoutingRecorder:
    """Records, per engine request, the experts of every token the engine fed: `routes[request.id]` is
    [n MoE layers, positions, top_k] (long; -1 where nothing was fed)."""

    def __init__(self, model: nn.Module, engine, max_len: int):
        self.layers = main_moe_layers(model)
        self.engine = engine
        self.max_len = max_len
        self.top_k = model.config.num_experts_per_tok
        self.routes: dict[int, torch.Tensor] = {}
        self._layout: list[tuple[int, int, int]] = []  # (request id, first position, new tokens) per batch row
        self._width = 0
        self._handles = []

    def __enter__(self) -> "RoutingRecorder":
        self.engine.forward_observers.append(self._observe)
        for i, moe in enumerate(self.layers):
            self._handles.append(moe.gate.register_forward_hook(self._hook(i)))
        return self

    def __exit__(self, *exc) -> None:
        self.engine.forward_observers.remove(self._observe)
        for h in self._handles:
            h.remove()
        self._handles = []

    def _observe(self, requests, n_new: list[int], width: int) -> None:
        cache = self.engine.cache
        self._layout = [(r.id, cache.lengths[r.slot], n) for r, n in zip(requests, n_new)]
        self._width = width
        for r in requests:
            if r.id not in self.routes:
                self.routes[r.id] = torch.full((len(self.layers), self.max_len, self.top_k), -1, dtype=torch.long)

    def _hook(self, layer: int):
        def record(module, inputs, output) -> None:
            if not self._layout:
                return
            chosen = output.indices.detach().to("cpu").view(-1, self._width, self.top_k)  # [rows, width, k]
            for row, (rid, start, n) in enumerate(self._layout):
                self.routes[rid][layer, start:start + n] = chosen[row, :n]
        return record


@contextlib.contextmanager
def replay_routing(model: nn.Module, experts: list[torch.Tensor] | None):
    """Within the block, the main MoE layers route to `experts` (one [B*S, top_k] tensor a layer, for forwards of
    B x S tokens) instead of choosing; None changes nothing. Backward passes must run inside the block too when
    activation checkpointing recomputes the forward."""
    layers = main_moe_layers(model)
    if experts is not None and len(experts) != len(layers):
        raise ValueError(f"routing replay got experts for {len(experts)} MoE layers: the model has {len(layers)}")
    try:
        if experts is not None:
            for moe, chosen in zip(layers, experts):
                moe.gate.set_routing_hook(RoutingHook(experts=chosen))
        yield
    finally:
        if experts is not None:
            for moe in layers:
                moe.gate.set_routing_hook(None)


@contextlib.contextmanager
def capture_routing(model: nn.Module):
    """Within the block, collect the experts [T, top_k] each main MoE layer's router returns, a list per layer."""
    layers = main_moe_layers(model)
    captured: list[list[torch.Tensor]] = [[] for _ in layers]
    handles = [moe.gate.register_forward_hook(lambda m, i, out, k=k: captured[k].append(out.indices.detach()))
               for k, moe in enumerate(layers)]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def mismatch_rate(chosen: list[torch.Tensor], recorded: list[torch.Tensor], valid: torch.Tensor) -> torch.Tensor:
    """The share of (token, layer) pairs, over tokens where `valid` [T], whose expert sets differ between
    `chosen` and `recorded` (per layer [T, top_k] each)."""
    differs = [(c.sort(dim=-1).values != r.to(c.device).sort(dim=-1).values).any(dim=-1) for c, r in
               zip(chosen, recorded)]  # per layer [T]
    stacked = torch.stack(differs)[:, valid]  # [layers, valid tokens]
    return stacked.float().mean() if stacked.numel() else torch.zeros(())
