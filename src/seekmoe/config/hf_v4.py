"""DeepSeek-V4's config.json: transformers' DeepseekV4Config keys (and the legacy spellings DeepSeek's release and
older transformers write: compress_ratios, compress_rate_csa/hca, num_hash_layers, qk_rope_head_dim, a flat
rope_scaling) read into ModelConfig's fields, and written back as transformers writes them."""

from __future__ import annotations

from typing import Any

# transformers' DeepseekV4Config defaults, for keys a config.json leaves out.
V4_DEFAULTS: dict[str, Any] = {
    "vocab_size": 129280, "hidden_size": 4096, "moe_intermediate_size": 2048, "num_hidden_layers": 43,
    "num_attention_heads": 64, "head_dim": 512, "q_lora_rank": 1024, "num_experts_per_tok": 6,
    "n_routed_experts": 256, "n_shared_experts": 1, "scoring_func": "sqrtsoftplus", "norm_topk_prob": True,
    "routed_scaling_factor": 1.5, "max_position_embeddings": 1048576, "rope_theta": 10000.0,
    "compress_rope_theta": 160000.0, "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "swiglu_limit": 10.0,
    "sliding_window": 128, "o_groups": 8, "o_lora_rank": 1024, "index_n_heads": 64, "index_head_dim": 128,
    "index_topk": 512, "num_nextn_predict_layers": 1, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "bos_token_id": 0, "eos_token_id": 1, "initializer_range": 0.02,
}
DEFAULT_COMPRESS_RATES = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
_DEFAULT_HASH_LAYERS = 3
# V4 has no MLA latent, expert groups or dense layers: these ModelConfig fields are not written for it.
_NOT_V4_KEYS = ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim", "n_group", "topk_group", "topk_method",
                "first_k_dense_replace", "intermediate_size", "rope_interleave", "rope_scaling", "moe_layer_freq")
# Keys transformers writes that follow from others (or that seekmoe does not model); read and dropped.
V4_DERIVED_KEYS = ("num_key_value_heads", "partial_rotary_factor", "qk_rope_head_dim", "rope_parameters",
                   "compress_ratios", "compress_rate_csa", "compress_rate_hca", "num_hash_layers", "rope_scaling")
# ModelConfig's DeepSeek-V4 fields, which a V2/V3 config.json does not carry.
V4_ONLY_FIELDS = ("layer_types", "compress_rates", "compress_rope_theta", "head_dim", "sliding_window", "o_groups",
                  "o_lora_rank", "index_n_heads", "index_head_dim", "index_topk", "hc_mult", "hc_sinkhorn_iters",
                  "hc_eps", "mlp_layer_types", "swiglu_limit")
YARN_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")


def v4_from_hf(d: dict) -> dict:
    """The ModelConfig keyword arguments a deepseek_v4 config.json dict `d` gives (unknown keys left in `d`)."""
    d = dict(d)
    for key, value in V4_DEFAULTS.items():
        d.setdefault(key, value)
    L = d["num_hidden_layers"]
    rates = dict(d.get("compress_rates") or DEFAULT_COMPRESS_RATES)
    for legacy, kind in (("compress_rate_csa", "compressed_sparse_attention"),
                         ("compress_rate_hca", "heavily_compressed_attention")):
        if d.get(legacy) is not None:
            rates[kind] = d[legacy]
    d["compress_rates"] = rates
    if d.get("layer_types") is None:
        ratios = d.get("compress_ratios")
        if isinstance(ratios, list):  # per layer: 0 = sliding window only, else the rate of CSA or HCA
            by_rate = {0: "sliding_attention", **{rate: kind for kind, rate in rates.items()}}
            if any(r not in by_rate for r in ratios):
                raise ValueError(f"config.json compress_ratios={ratios!r} is invalid: expected entries from "
                                 f"{sorted(by_rate)} (0 = sliding window only, else a rate of compress_rates)")
            d["layer_types"] = [by_rate[r] for r in ratios]
        elif isinstance(L, int):  # transformers' default: two HCA layers, then CSA and HCA alternating
            d["layer_types"] = (["heavily_compressed_attention"] * min(L, 2)
                                + ["compressed_sparse_attention" if i % 2 else "heavily_compressed_attention"
                                   for i in range(max(L - 2, 0))])
    if d.get("mlp_layer_types") is None and isinstance(L, int):
        n_hash = d.get("num_hash_layers")
        n_hash = _DEFAULT_HASH_LAYERS if n_hash is None else n_hash
        d["mlp_layer_types"] = ["hash_moe"] * min(L, n_hash) + ["moe"] * max(0, L - n_hash)
    for key in ("layer_types", "mlp_layer_types"):  # as transformers does: a longer list is cut to the layers
        if isinstance(d[key], list) and isinstance(L, int):
            d[key] = list(d[key][:L]) if len(d[key]) > L else d[key]
    rope = d.get("rope_parameters") or {}
    main, compress = rope.get("main"), rope.get("compress")
    if not (isinstance(main, dict) and isinstance(compress, dict)):  # flat: the compressed branches' YaRN
        flat = {**(d.get("rope_scaling") or {}), **{k: v for k, v in rope.items() if k not in ("main", "compress")}}
        main, compress = {"rope_theta": d["rope_theta"]}, {**flat, "rope_theta": d["compress_rope_theta"]}
    d["rope_theta"] = float(main.get("rope_theta", d["rope_theta"]))
    d["compress_rope_theta"] = float(compress.get("rope_theta", d["compress_rope_theta"]))
    kind = compress.get("rope_type", compress.get("type", "default"))
    if kind == "yarn":
        d["rope_scaling"] = {"type": "yarn", **{k: compress[k] for k in YARN_KEYS if compress.get(k) is not None}}
    elif kind not in ("default", None):
        raise ValueError(f"config.json compressed-branch rope type {kind!r} is not supported: expected 'yarn' "
                         f"or 'default'")
    else:
        d["rope_scaling"] = None
    factor = d.get("partial_rotary_factor") or main.get("partial_rotary_factor")
    head_dim = d["head_dim"]
    if factor:
        d["qk_rope_head_dim"] = int(head_dim * factor)
    elif not d.get("qk_rope_head_dim"):
        d["qk_rope_head_dim"] = int(head_dim * 64 / 512)
    d["intermediate_size"] = d["moe_intermediate_size"]  # transformers' attribute_map: one width for both
    d.update(n_group=1, topk_group=1, topk_method="noaux_tc", first_k_dense_replace=0)
    for key in V4_DERIVED_KEYS:
        if key not in ("qk_rope_head_dim", "rope_scaling"):
            d.pop(key, None)
    return d


def v4_to_hf(config, d: dict) -> dict:
    """`d` (ModelConfig's fields as a dict) as the config.json transformers writes for DeepseekV4Config."""
    for key in _NOT_V4_KEYS:
        d.pop(key, None)
    partial = config.qk_rope_head_dim / config.head_dim
    compress: dict[str, Any] = {"rope_type": "default", "rope_theta": config.compress_rope_theta,
                                "partial_rotary_factor": partial}
    if config.rope_scaling:
        # The V4 reference does not scale cos/sin by YaRN's mscale: transformers pins attention_factor to 1.
        compress.update({k: v for k, v in config.rope_scaling.items() if k != "type"}, rope_type="yarn",
                        attention_factor=1.0)
    d.update(architectures=["DeepseekV4ForCausalLM"], hidden_act="silu", num_key_value_heads=1,
             partial_rotary_factor=partial, qk_rope_head_dim=config.qk_rope_head_dim,
             rope_parameters={"main": {"rope_type": "default", "rope_theta": config.rope_theta,
                                       "partial_rotary_factor": partial}, "compress": compress})
    return d
