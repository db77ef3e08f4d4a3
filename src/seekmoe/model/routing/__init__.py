"""Routing: one router interface (interface.py) for DeepSeek's router (deepseek.py) and the MoE literature's
(literature.py), expert capacity (capacity.py), and `build_router`, which picks the router `config.router_type`
names."""

from __future__ import annotations

from ...config import ModelConfig
from .capacity import limit_capacity
from .deepseek import DeepSeekRouter
from .hash_table import HashTableRouter
from .interface import Router, RouterOutput, RoutingHook, Scores
from .literature import (GShardRouter, HashRouter, HierarchicalRouter, NoisyTopKRouter, SwitchRouter,
                         switch_balance_loss)

ROUTERS: dict[str, type[Router]] = {"deepseek": DeepSeekRouter, "switch": SwitchRouter, "gshard": GShardRouter,
                                    "noisy_topk": NoisyTopKRouter, "hash": HashRouter,
                                    "hierarchical": HierarchicalRouter}


def build_router(config: ModelConfig, layer_idx: int | None = None) -> Router:
    """The router `config.router_type` names (DeepSeek-V4: the token table for a `hash_moe` layer `layer_idx`)."""
    if config.is_v4 and layer_idx is not None and config.mlp_layer_types[layer_idx] == "hash_moe":
        return HashTableRouter(config)
    if config.router_type not in ROUTERS:
        raise ValueError(f"router_type={config.router_type!r}: expected one of {sorted(ROUTERS)}")
    return ROUTERS[config.router_type](config)


__all__ = ["ROUTERS", "DeepSeekRouter", "GShardRouter", "HashTableRouter", "HashRouter", "HierarchicalRouter", "NoisyTopKRouter",
           "Router", "RouterOutput", "RoutingHook", "Scores", "SwitchRouter", "build_router", "limit_capacity",
           "switch_balance_loss"]
