"""Recording what every MoE layer of a model decided, token by token, through forward hooks (the model is unchanged).

`RoutingCapture` is what the statistics, the probes and the report of `seekmoe analyze` read: for each main MoE
layer and each token routed while it is active, the chosen experts, their gate weights, the entropy of the router's
affinities and the norms of the shared and routed experts' outputs; and per layer, how many slots it dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..model.moe import MoE


@dataclass
class LayerRouting:
    """One MoE layer's routing of N tokens (in the order they were run, batch-major then position)."""

    layer: int  # decoder block index
    indices: torch.Tensor  # [N, top_k] long: chosen expert ids
    weights: torch.Tensor  # [N, top_k] fp32: their gate values
    entropy: torch.Tensor  # [N] fp32: entropy (nats) of the token's affinities normalized to sum 1
    dropped_slots: int  # slots the layer dropped over its experts' capacity (0 when dropless)
    shared_norm: torch.Tensor  # [N] fp32: ||shared experts' output||_2 (zeros without shared experts)
    routed_norm: torch.Tensor  # [N] fp32: ||routed experts' combined output||_2


@dataclass
class _Pending:
    indices: list[torch.Tensor] = field(default_factory=list)
    weights: list[torch.Tensor] = field(default_factory=list)
    entropy: list[torch.Tensor] = field(default_factory=list)
    dropped: list[torch.Tensor] = field(default_factory=list)  # [] per forward
    shared: list[torch.Tensor] = field(default_factory=list)
    routed: list[torch.Tensor] = field(default_factory=list)
    shared_out: torch.Tensor | None = None  # [B, S, hidden] of the forward in progress


def main_moe_layers(model: nn.Module) -> list[tuple[int, MoE]]:
    """(decoder block index, MoE) for every MoE layer of the main stack (MTP modules left out); a vision-language
    model's are its language model's."""
    lm = getattr(model, "language_model", model)
    return [(i, block.mlp) for i, block in enumerate(lm.model.layers) if isinstance(block.mlp, MoE)]


def token_entropy(scores: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each row of affinities [T, E] once normalized to sum 1 (softmax scores already do;
    sigmoid ones do not) -> [T]."""
    p = scores.float() / scores.float().sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return -(p * p.clamp_min(1e-20).log()).sum(dim=-1)


class RoutingCapture:
    """A context manager that records every main MoE layer's routing while the model runs.

        with RoutingCapture(model) as capture:
            model(ids)
        layers = capture.layers()  # one LayerRouting per MoE layer

    Dropped slots are read from the layer's MoEStats (`dropped_slots`, where capacity-limited routing sets it);
    a layer that does not report them is dropless.
    """

    def __init__(self, model: nn.Module):
        self.moe = main_moe_layers(model)
        if not self.moe:
            raise ValueError("the model has no MoE layer to analyze (every layer is dense)")
        self._pending = [_Pending() for _ in self.moe]
        self._handles: list = []

    def __enter__(self) -> "RoutingCapture":
        for pending, (_, moe) in zip(self._pending, self.moe):
            self._handles.append(moe.gate.register_forward_hook(self._on_route(pending)))
            if moe.shared_experts is not None:
                self._handles.append(moe.shared_experts.register_forward_hook(self._on_shared(pending)))
            self._handles.append(moe.register_forward_hook(self._on_moe(pending)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @staticmethod
    def _on_route(pending: _Pending):
        def hook(module, args, route):
            pending.indices.append(route.indices.detach().cpu())
            pending.weights.append(route.weights.detach().float().cpu())
            pending.entropy.append(token_entropy(route.scores.detach()).cpu())
        return hook

    @staticmethod
    def _on_shared(pending: _Pending):
        def hook(module, args, out):
            pending.shared_out = out.detach()
        return hook

    @staticmethod
    def _on_moe(pending: _Pending):
        def hook(module, args, out):
            y = out[0].detach().float().flatten(0, -2)  # [T, hidden] = routed + shared
            shared = pending.shared_out
            pending.shared_out = None
            shared = torch.zeros_like(y) if shared is None else shared.float().flatten(0, -2)
            pending.shared.append(shared.norm(dim=-1).cpu())
            pending.routed.append((y - shared).norm(dim=-1).cpu())
            dropped = getattr(out[1], "dropped_slots", None)
            pending.dropped.append(torch.zeros((), dtype=torch.long) if dropped is None else dropped.detach().cpu())
        return hook

    def layers(self) -> list[LayerRouting]:
        """What was recorded so far, one LayerRouting per main MoE layer."""
        out = []
        for pending, (index, moe) in zip(self._pending, self.moe):
            if not pending.indices:
                empty = torch.zeros(0, moe.config.num_experts_per_tok)
                out.append(LayerRouting(index, empty.long(), empty, torch.zeros(0), 0, torch.zeros(0),
                                        torch.zeros(0)))
                continue
            out.append(LayerRouting(index, torch.cat(pending.indices), torch.cat(pending.weights),
                                    torch.cat(pending.entropy), int(sum(int(d) for d in pending.dropped)),
                                    torch.cat(pending.shared), torch.cat(pending.routed)))
        return out
