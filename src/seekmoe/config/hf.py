"""ModelConfig <-> Hugging Face config.json: DeepSeek-V2/V3 keys in transformers 4.x and 5.x spellings, seekmoe's
own router keys left out at their defaults, unknown keys kept and written back unchanged."""

from __future__ import annotations

import dataclasses
from dataclasses import fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .fields import ModelConfig

ROPE_SCALING_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")

# Keys transformers writes that follow from other fields; read and recomputed, never stored twice.
_DERIVED_KEYS = {"model_type", "architectures", "hidden_act", "num_key_value_heads", "qk_head_dim", "head_dim",
                 "moe_layer_freq", "transformers_version", "torch_dtype", "dtype", "auto_map", "use_cache"}

# The router fields' defaults, left out of config.json (a DeepSeek-router model's config.json lists DeepSeek's keys).
_ROUTER_DEFAULTS = {"router_type": "deepseek", "capacity_factor": None, "eval_capacity_factor": None,
                    "router_jitter": 0.0, "router_aux_loss_coef": None, "second_expert_threshold": 0.2}


# DeepSeek-V3.2's indexer fields (fields.py), and the defaults of transformers' DeepseekV32Config for a config.json
# that leaves them out.
_V32_KEYS = ("index_topk", "index_n_heads", "index_head_dim")
_V32_DEFAULTS = {"index_topk": 2048, "index_n_heads": 64, "index_head_dim": 128}


def config_from_hf_dict(cls: type["ModelConfig"], d: dict) -> "ModelConfig":
    """A `cls` from a DeepSeek-V2/V3 config.json dict (transformers 4.x `rope_scaling` or 5.x `rope_parameters`)."""
    d = dict(d)
    known = {f.name for f in fields(cls)} - {"extra"}
    kwargs: dict[str, Any] = {}
    rope = d.pop("rope_parameters", None)
    scaling = d.pop("rope_scaling", None)
    if rope:  # transformers 5.x: theta and scaling in one dict
        if "rope_theta" in rope:
            kwargs["rope_theta"] = float(rope["rope_theta"])
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            scaling = rope
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind not in ("yarn", None):
            raise ValueError(f"config.json rope scaling type {kind!r} is not supported: expected 'yarn'")
        kwargs["rope_scaling"] = {"type": "yarn", **{k: scaling[k] for k in ROPE_SCALING_KEYS if k in scaling}}
    if d.get("model_type") in ("deepseek_v3", "deepseek_v32"):
        d.setdefault("scoring_func", "sigmoid")
        d.setdefault("topk_method", "noaux_tc")
    if d.get("model_type") == "deepseek_v32":
        _read_v32_layer_lists(d)
    elif d.get("model_type") == "deepseek_v2":
        d.setdefault("scoring_func", "softmax")
        d.setdefault("topk_method", "greedy")
        d.setdefault("n_group", d.get("n_group") or 1)
        d.setdefault("topk_group", d.get("topk_group") or 1)
        d.setdefault("norm_topk_prob", False)
        d.setdefault("routed_scaling_factor", 1.0)
        d.setdefault("num_nextn_predict_layers", 0)
        d.setdefault("first_k_dense_replace", 0)
    for key in ("n_group", "topk_group"):  # V2-Lite writes null for these
        if key in d and d[key] is None:
            d[key] = 1
    if d.get("n_routed_experts") is None:
        d["n_routed_experts"] = 0
    if "num_mtp_layers" in d:
        d.setdefault("num_nextn_predict_layers", d.pop("num_mtp_layers"))
    for key in ("bos_token_id", "eos_token_id"):
        if isinstance(d.get(key), list):
            d[key] = d[key][0]
    extra = {}
    for k, v in d.items():
        if k in known:
            kwargs[k] = v
        elif k not in _DERIVED_KEYS:
            extra[k] = v
    return cls(**kwargs, extra=extra)


def config_to_hf_dict(config: "ModelConfig") -> dict:
    """A config.json dict that transformers' AutoConfig reads as DeepseekV2Config or DeepseekV3Config."""
    d = {k: v for k, v in dataclasses.asdict(config).items() if k != "extra"}
    d = {**config.extra, **d}
    for key, default in _ROUTER_DEFAULTS.items():  # DeepSeek-router configs stay as they were
        if d.get(key) == default:
            d.pop(key)
    d["model_type"] = config.model_type
    d["architectures"] = ({"deepseek_v3": ["DeepseekV3ForCausalLM"], "deepseek_v2": ["DeepseekV2ForCausalLM"],
                           "deepseek_v32": ["DeepseekV32ForCausalLM"]}
                          .get(config.model_type, ["SeekMoEForCausalLM"]))
    d["hidden_act"] = "silu"
    d["num_key_value_heads"] = config.num_attention_heads
    d["moe_layer_freq"] = 1
    d.pop("rope_interleave")
    if config.index_topk is None:  # V2/V3 configs carry no indexer keys
        for key in _V32_KEYS:
            d.pop(key)
    if config.model_type == "deepseek_v32":
        # transformers' DeepseekV32Config always rotates interleaved pairs: it has no rope_interleave key
        _write_v32_layer_lists(config, d)
    elif config.model_type != "deepseek_v2":
        d["rope_interleave"] = config.rope_interleave
    elif not config.rope_interleave:
        raise ValueError("ModelConfig.rope_interleave=False cannot be written as a deepseek_v2 config: "
                         "DeepSeek-V2 always rotates interleaved pairs")
    # Both spellings of the rope settings: transformers 4.x reads rope_theta/rope_scaling, 5.x rope_parameters.
    if config.rope_scaling:
        d["rope_parameters"] = {"rope_type": "yarn", "rope_theta": config.rope_theta,
                                **{k: v for k, v in config.rope_scaling.items() if k != "type"}}
    else:
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": config.rope_theta}
    return d


def _read_v32_layer_lists(d: dict) -> None:
    """DeepseekV32Config's per-layer lists, in place: `layer_types` must be all 'indexed_attention' (every layer
    sparse); `mlp_layer_types` ('dense' then 'sparse') becomes first_k_dense_replace."""
    for key, default in _V32_DEFAULTS.items():
        if d.get(key) is None:
            d[key] = default
    # transformers' DeepseekV32Config has no MTP field (DeepSeek's own config.json says 1 and ships the layer)
    d.setdefault("num_nextn_predict_layers", 0)
    n = d.get("num_hidden_layers")
    layer_types = d.pop("layer_types", None)
    if layer_types is not None:
        if not isinstance(layer_types, list) or len(layer_types) != n or \
                any(kind != "indexed_attention" for kind in layer_types):
            raise ValueError(f"ModelConfig.layer_types={layer_types!r} is invalid: expected None or "
                             f"num_hidden_layers={n} entries, each 'indexed_attention' (DeepSeek-V3.2)")
    mlp_types = d.pop("mlp_layer_types", None)
    if mlp_types is not None:
        ok = isinstance(mlp_types, list) and len(mlp_types) == n
        dense = mlp_types.count("dense") if ok else 0
        if not ok or mlp_types != ["dense"] * dense + ["sparse"] * (n - dense):
            raise ValueError(f"ModelConfig.mlp_layer_types={mlp_types!r} is invalid: expected num_hidden_layers={n} "
                             f"entries, 'dense' ones first and then 'sparse' ones")
        d["first_k_dense_replace"] = dense


def _write_v32_layer_lists(config: "ModelConfig", d: dict) -> None:
    """The per-layer lists transformers' DeepseekV32Config reads (it places MoE layers by mlp_layer_types)."""
    L = config.num_hidden_layers
    d["layer_types"] = ["indexed_attention"] * L
    d["mlp_layer_types"] = ["sparse" if config.is_moe_layer(i) else "dense" for i in range(L)]
