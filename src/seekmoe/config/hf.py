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

# seekmoe's own router and modality keys at their defaults are left out of config.json (a DeepSeek-router text model's
# config.json lists DeepSeek's keys only).
_ROUTER_DEFAULTS = {"router_type": "deepseek", "capacity_factor": None, "eval_capacity_factor": None,
                    "router_jitter": 0.0, "router_aux_loss_coef": None, "second_expert_threshold": 0.2,
                    "modality_expert_groups": None, "media_placeholder_token_id": None}


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
    if d.get("model_type") == "deepseek_v3":
        d.setdefault("scoring_func", "sigmoid")
        d.setdefault("topk_method", "noaux_tc")
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
    d["architectures"] = ({"deepseek_v3": ["DeepseekV3ForCausalLM"], "deepseek_v2": ["DeepseekV2ForCausalLM"]}
                          .get(config.model_type, ["SeekMoEForCausalLM"]))
    d["hidden_act"] = "silu"
    d["num_key_value_heads"] = config.num_attention_heads
    d["moe_layer_freq"] = 1
    d.pop("rope_interleave")
    if config.model_type != "deepseek_v2":
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
