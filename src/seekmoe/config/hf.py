"""ModelConfig <-> Hugging Face config.json: DeepSeek-V2/V3 keys in transformers 4.x and 5.x spellings, seekmoe's
own router keys left out at their defaults, unknown keys kept and written back unchanged."""

from __future__ import annotations

import dataclasses
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from .hf_v4 import V4_ONLY_FIELDS, v4_from_hf, v4_to_hf

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


# DeepSeek-V3.2's indexer fields (fields.py), and the defaults of transformers' DeepseekV32Config for a config.json
# that leaves them out.
_V32_KEYS = ("index_topk", "index_n_heads", "index_head_dim")
_V32_DEFAULTS = {"index_topk": 2048, "index_n_heads": 64, "index_head_dim": 128}


def config_from_hf_dict(cls: type["ModelConfig"], d: dict) -> "ModelConfig":
    """A `cls` from a DeepSeek-V2/V3 config.json dict (transformers 4.x `rope_scaling` or 5.x `rope_parameters`)."""
    d = dict(d)
    known = {f.name for f in fields(cls)} - {"extra"}
    kwargs: dict[str, Any] = {}
    if d.get("model_type") == "deepseek_v4":  # its own rope layout and legacy keys (hf_v4.py)
        d = v4_from_hf(d)
        kwargs["rope_scaling"] = d.pop("rope_scaling")
    else:
        d.pop("head_dim", None)  # V2/V3: transformers writes qk_rope_head_dim again under this name
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
    family = _read_family(d)
    if family is not None:
        kwargs["family"] = family
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
        elif k not in _DERIVED_KEYS or (k == "auto_map" and family):  # Kimi's and DeepSeekMoE's remote code
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
    if config.is_v4:
        return v4_to_hf(config, d)
    for key in V4_ONLY_FIELDS:  # at their defaults (validation.py): not part of a V2/V3 config.json
        if key not in _V32_KEYS:  # the indexer's fields are V3.2's too (below)
            d.pop(key, None)
    d["architectures"] = ({"deepseek_v3": ["DeepseekV3ForCausalLM"], "deepseek_v2": ["DeepseekV2ForCausalLM"],
                           "deepseek_v32": ["DeepseekV32ForCausalLM"], **_FAMILY_ARCHITECTURES}
                          .get(config.model_type, ["SeekMoEForCausalLM"]))
    d["hidden_act"] = "silu"
    d["num_key_value_heads"] = config.num_attention_heads
    d["moe_layer_freq"] = 1
    _write_family(config, d)
    d.pop("rope_interleave")
    if config.index_topk is None:  # V2/V3 configs carry no indexer keys
        for key in _V32_KEYS:
            d.pop(key)
    if config.model_type == "deepseek_v32":
        # transformers' DeepseekV32Config always rotates interleaved pairs: it has no rope_interleave key
        _write_v32_layer_lists(config, d)
    elif config.model_type != "deepseek_v2" or not config.use_mla:
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


# ----- issue 21: families read as another family's numerics (GLM-4.7-Flash, Kimi-K2, multi-head attention) -----
_FAMILY_ARCHITECTURES = {"glm4_moe_lite": ["Glm4MoeLiteForCausalLM"], "kimi_k2": ["DeepseekV3ForCausalLM"],
                         "deepseek": ["DeepseekForCausalLM"], "deepseek_ocr2_text": ["DeepseekOcr2TextModel"]}
_MHA_KINDS = ("deepseek", "deepseek_ocr2_text")


def _read_family(d: dict) -> str | None:
    """Fill in (in place) what the config.json of a GLM-4.7-Flash, Kimi-K2/Moonlight, DeepSeekMoE (`deepseek`,
    remote code), DeepSeek-OCR-2 text model or multi-head DeepSeek-V2 (DeepSeek-VL2-Tiny) leaves to its family's
    code, and return the model_type to write it back under (None when the fields imply it)."""
    kind = d.get("model_type")
    mha = kind in _MHA_KINDS or (kind == "deepseek_v2" and d.get("use_mla") is False)
    if kind not in ("glm4_moe_lite", "kimi_k2") and not mha:
        return None
    if "mlp_layer_types" in d:
        d["first_k_dense_replace"] = _dense_prefix(d.pop("mlp_layer_types"))
    if kind in ("glm4_moe_lite", "kimi_k2"):  # DeepSeek-V3's router
        d.setdefault("scoring_func", "sigmoid")
        d.setdefault("topk_method", "noaux_tc")
        if kind == "glm4_moe_lite":  # transformers' Glm4MoeLiteConfig: MoE from the second layer, no MTP key
            d.setdefault("first_k_dense_replace", 1)
            d.setdefault("num_nextn_predict_layers", 0)
            d.setdefault("n_group", 1)
            d.setdefault("topk_group", 1)
        return kind
    d["use_mla"] = False
    d.setdefault("rope_interleave", False)  # multi-head DeepSeek models rotate half-split pairs (Llama's RoPE)
    kv_heads = d.get("num_key_value_heads")
    if kv_heads is not None and kv_heads != d.get("num_attention_heads", kv_heads):
        raise ValueError(f"config.json num_key_value_heads={kv_heads!r} is not supported: expected "
                         f"num_attention_heads={d.get('num_attention_heads')!r} (multi-head attention)")
    if kind in _MHA_KINDS:  # DeepSeek-V2's softmax router without the V2 extras (DeepSeekMoE's and OCR-2's)
        d.setdefault("scoring_func", "softmax")
        d.setdefault("topk_method", "greedy")
        d.setdefault("norm_topk_prob", False)
        d.setdefault("routed_scaling_factor", 1.0)
        d.setdefault("num_nextn_predict_layers", 0)
        d.setdefault("first_k_dense_replace", 0)
        for key in ("n_group", "topk_group"):
            if d.get(key) is None:
                d[key] = 1
        if d.get("num_experts_per_tok") is None:  # DeepseekOcr2TextConfig's default (a dense model)
            d["num_experts_per_tok"] = 1
    return None if kind == "deepseek_ocr2_text" else kind


def _dense_prefix(types: object) -> int:
    """first_k_dense_replace from transformers' `mlp_layer_types` (["dense", ..., "sparse", ...])."""
    if (not isinstance(types, list) or any(t not in ("dense", "sparse") for t in types)
            or "sparse" in types and "dense" in types[types.index("sparse"):]):
        raise ValueError(f"config.json mlp_layer_types={str(types)[:200]} is not supported: expected a list of "
                         f"'dense' layers followed by 'sparse' ones")
    return types.index("sparse") if "sparse" in types else len(types)


def mha_model_type(config: "ModelConfig") -> str:
    """The model_type a multi-head-attention config is written as: transformers' DeepSeek-OCR-2 text model when
    its router and RoPE are that model's (softmax top-k without normalization, half-split rotation), else a
    seekmoe name transformers refuses."""
    ocr2 = (config.scoring_func == "softmax" and config.topk_method in ("greedy", "group_limited_greedy")
            and not config.norm_topk_prob and not config.rope_interleave)
    return "deepseek_ocr2_text" if ocr2 else "seekmoe_mha"


def _write_family(config: "ModelConfig", d: dict) -> None:
    """The keys of `d` (config.json) that the family's transformers config reads instead of, or beside, DeepSeek's."""
    d.pop("family", None)
    if config.use_mla:  # MLA configs stay as DeepSeek writes them (GLM's lists attention_bias: false)
        d.pop("use_mla")
        if config.model_type != "glm4_moe_lite":
            d.pop("attention_bias")
    if not config.use_mla:
        d["head_dim"] = config.mha_head_dim
    if config.model_type in ("glm4_moe_lite", "deepseek_ocr2_text"):
        d["mlp_layer_types"] = [("sparse" if config.is_moe_layer(i) else "dense")
                                for i in range(config.num_hidden_layers)]

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
        # transformers 5.25 names the kind 'indexed_attention'; 5.17 (the oldest we support) 'deepseek_sparse_attention'
        if not isinstance(layer_types, list) or len(layer_types) != n or \
                any(kind not in ("indexed_attention", "deepseek_sparse_attention") for kind in layer_types):
            raise ValueError(f"ModelConfig.layer_types={layer_types!r} is invalid: expected None or "
                             f"num_hidden_layers={n} entries, each 'indexed_attention' (DeepSeek-V3.2; "
                             f"'deepseek_sparse_attention' in transformers before 5.25)")
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
    # No layer_types: every layer is sparse, which is what an absent list means to every transformers version, and
    # the kind's name changed ('deepseek_sparse_attention' in 5.17, 'indexed_attention' in 5.25; each refuses the other)
    d.pop("layer_types", None)
    d["mlp_layer_types"] = ["sparse" if config.is_moe_layer(i) else "dense" for i in range(L)]
