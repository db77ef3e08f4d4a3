"""DeepSeek-V4's fields checked: per-layer attention and MoE types, compression rates, the attention's and the
hyper-connections' shapes (the first bad field named with what was expected)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .validation import V4_LAYER_TYPES, V4_MLP_LAYER_TYPES

if TYPE_CHECKING:
    from .fields import ModelConfig


def validate_v4(config: "ModelConfig") -> None:
    """Raise ValueError naming the first DeepSeek-V4 field of `config` that cannot describe a model."""

    def bad(name: str, expected: str) -> ValueError:
        return ValueError(f"ModelConfig.{name}={getattr(config, name)!r} is invalid: expected {expected}")

    L = config.num_hidden_layers
    for name, allowed in (("layer_types", V4_LAYER_TYPES), ("mlp_layer_types", V4_MLP_LAYER_TYPES)):
        value = getattr(config, name)
        if not isinstance(value, list) or len(value) != L:
            raise bad(name, f"a list of num_hidden_layers={L} entries, one of {allowed} each")
        unknown = [t for t in value if t not in allowed]
        if unknown:
            raise bad(name, f"entries from {allowed}; {unknown[0]!r} is not one")
    rates = config.compress_rates
    used = {t for t in config.layer_types if t != "sliding_attention"}
    if not isinstance(rates, dict) or any(t not in rates for t in used):
        raise bad("compress_rates", f"a dict giving the compression rate of {sorted(used)}")
    for kind, rate in rates.items():
        if kind not in V4_LAYER_TYPES[1:]:
            raise bad("compress_rates", f"keys from {V4_LAYER_TYPES[1:]}; {kind!r} is not one")
        if not isinstance(rate, int) or isinstance(rate, bool) or rate < 1:
            raise bad("compress_rates", f"a positive integer rate for {kind!r}")
    for name in ("head_dim", "sliding_window", "o_groups", "o_lora_rank", "index_n_heads", "index_head_dim",
                 "index_topk", "hc_mult", "hc_sinkhorn_iters"):
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise bad(name, "a positive integer")
    if config.q_lora_rank is None:
        raise bad("q_lora_rank", "a positive integer (DeepSeek-V4's query is always low-rank)")
    if config.qk_rope_head_dim > config.head_dim:
        raise bad("qk_rope_head_dim", f"at most head_dim={config.head_dim} (the rotated tail of each head)")
    if config.index_head_dim < config.qk_rope_head_dim:
        raise bad("index_head_dim", f"at least qk_rope_head_dim={config.qk_rope_head_dim} (its rotated tail)")
    if config.num_attention_heads % config.o_groups:
        raise bad("o_groups", f"a divisor of num_attention_heads={config.num_attention_heads}")
    if config.first_k_dense_replace != 0:
        raise bad("first_k_dense_replace", "0: every DeepSeek-V4 layer is a MoE layer")
    if config.n_routed_experts == 0:
        raise bad("n_routed_experts", "a positive number: every DeepSeek-V4 layer is a MoE layer")
    if config.n_group != 1 or config.topk_group != 1:
        raise bad("n_group", "1 (with topk_group=1): DeepSeek-V4 routes without expert groups")
    if config.router_type != "deepseek":
        raise bad("router_type", "'deepseek' for a DeepSeek-V4 model (hash layers are mlp_layer_types='hash_moe')")
    if config.swiglu_limit is not None and (not isinstance(config.swiglu_limit, (int, float))
                                            or isinstance(config.swiglu_limit, bool) or config.swiglu_limit <= 0):
        raise bad("swiglu_limit", "None (no clamp) or a positive number")
    if not isinstance(config.hc_eps, (int, float)) or config.hc_eps < 0:
        raise bad("hc_eps", "a non-negative number")
    if not isinstance(config.compress_rope_theta, (int, float)) or config.compress_rope_theta <= 0:
        raise bad("compress_rope_theta", "a positive number")
