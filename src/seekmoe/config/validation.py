"""ModelConfig's validation: every field checked, the first bad one named with what was expected."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .fields import ModelConfig

SCORING_FUNCS = ("softmax", "sigmoid", "sqrtsoftplus")  # sqrtsoftplus: sqrt(softplus(logits)), DeepSeek-V4
# greedy: plain top-k (V2-Lite); group_limited_greedy: groups scored by their best expert (V2);
# noaux_tc: groups scored by the sum of their two best experts, bias-corrected selection (V3).
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
# deepseek: DeepSeek's router (the default); the others are the MoE literature's, for comparison (model/routing/).
ROUTER_TYPES = ("deepseek", "switch", "gshard", "noisy_topk", "hash", "hierarchical")
# DeepSeek-V4's attention of a layer (layer_types) and its MoE routing (mlp_layer_types).
V4_LAYER_TYPES = ("sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention")
V4_MLP_LAYER_TYPES = ("hash_moe", "moe")


def validate(config: "ModelConfig") -> None:
    """Raise ValueError naming the first field of `config` whose value cannot describe a model."""

    def bad(name: str, expected: str) -> ValueError:
        return ValueError(f"ModelConfig.{name}={getattr(config, name)!r} is invalid: expected {expected}")

    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "kv_lora_rank", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings"):
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise bad(name, "a positive integer")
    for name in ("n_routed_experts", "n_shared_experts", "qk_nope_head_dim", "num_nextn_predict_layers",
                 "first_k_dense_replace"):
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise bad(name, "a non-negative integer")
    if config.q_lora_rank is not None and (not isinstance(config.q_lora_rank, int) or config.q_lora_rank <= 0):
        raise bad("q_lora_rank", "a positive integer, or None for a full-rank query projection")
    if config.qk_rope_head_dim % 2:
        raise bad("qk_rope_head_dim", "an even number (RoPE rotates pairs of dimensions)")
    if config.first_k_dense_replace > config.num_hidden_layers:
        raise bad("first_k_dense_replace", f"at most num_hidden_layers={config.num_hidden_layers}")
    if config.scoring_func not in SCORING_FUNCS:
        raise bad("scoring_func", f"one of {SCORING_FUNCS}")
    if config.topk_method not in TOPK_METHODS:
        raise bad("topk_method", f"one of {TOPK_METHODS}")
    if config.rms_norm_eps <= 0:
        raise bad("rms_norm_eps", "a positive number")
    if config.n_routed_experts > 0:
        _validate_routing(config)
    if config.rope_scaling is not None:
        _validate_rope_scaling(config)
    for name in ("aux_loss_alpha", "expert_balance_alpha", "device_balance_alpha", "router_z_loss_coef",
                 "bias_update_speed", "mtp_loss_weight"):
        if not isinstance(getattr(config, name), (int, float)) or getattr(config, name) < 0:
            raise bad(name, "a non-negative number")
    _validate_router_type(config)
    _validate_attention_choice(config)
    if config.is_v4:
        from .validation_v4 import validate_v4

        validate_v4(config)
    elif config.mlp_layer_types is not None or config.compress_rates is not None:
        raise bad("layer_types", "a list of per-layer attention types when mlp_layer_types or compress_rates is "
                                 "set (DeepSeek-V4)")
    else:
        _validate_sparse_attention(config)
    _validate_modality(config)

def _validate_router_type(config: "ModelConfig") -> None:
    def bad(name: str, expected: str) -> ValueError:
        return ValueError(f"ModelConfig.{name}={getattr(config, name)!r} is invalid: expected {expected}")

    if config.router_type not in ROUTER_TYPES:
        raise bad("router_type", f"one of {ROUTER_TYPES}")
    for name in ("capacity_factor", "eval_capacity_factor", "router_aux_loss_coef"):
        value = getattr(config, name)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0):
            raise bad(name, "None (the router's default) or a non-negative number (0 = off)")
    if not isinstance(config.router_jitter, (int, float)) or not 0 <= config.router_jitter < 1:
        raise bad("router_jitter", "a number in [0, 1)")
    if not isinstance(config.second_expert_threshold, (int, float)) or config.second_expert_threshold <= 0:
        raise bad("second_expert_threshold", "a positive number")
    if config.router_type == "deepseek":
        if config.router_jitter:
            raise bad("router_jitter", "0 with router_type='deepseek' (jitter belongs to the literature routers)")
        return
    if config.n_routed_experts == 0:
        raise bad("router_type", "'deepseek' for a dense model (n_routed_experts=0)")
    for name in ("expert_balance_alpha", "device_balance_alpha"):
        if getattr(config, name):
            raise bad(name, f"0 with router_type={config.router_type!r}: DeepSeekMoE's balance losses belong to "
                            f"router_type='deepseek'; set router_aux_loss_coef instead")
    k, E = config.num_experts_per_tok, config.n_routed_experts
    if config.router_type in ("switch", "hash") and k != 1:
        raise bad("num_experts_per_tok", f"1 with router_type={config.router_type!r} (one expert per token)")
    if config.router_type == "gshard" and k != 2:
        raise bad("num_experts_per_tok", "2 with router_type='gshard' (top-2 gating)")
    if config.router_type == "noisy_topk" and k >= E:
        raise bad("num_experts_per_tok", f"fewer than n_routed_experts={E} with router_type='noisy_topk' "
                                         f"(the load loss needs the (k+1)-th noisy logit)")
    if config.router_type == "hierarchical":
        if config.n_group < 2 or E % config.n_group:
            raise bad("n_group", f"a divisor of n_routed_experts={E} and at least 2 with "
                                 f"router_type='hierarchical' (the primary gate picks among n_group groups)")
        if k % config.topk_group or k // config.topk_group > E // config.n_group:
            raise bad("num_experts_per_tok", f"topk_group={config.topk_group} times the experts picked per group "
                                             f"(at most {E // config.n_group}) with router_type='hierarchical'")

def _validate_routing(config: "ModelConfig") -> None:
    def bad(name: str, expected: str) -> ValueError:
        return ValueError(f"ModelConfig.{name}={getattr(config, name)!r} is invalid: expected {expected}")

    if config.moe_intermediate_size <= 0:
        raise bad("moe_intermediate_size", "a positive integer")
    if not 1 <= config.num_experts_per_tok <= config.n_routed_experts:
        raise bad("num_experts_per_tok", f"between 1 and n_routed_experts={config.n_routed_experts}")
    if config.n_group < 1 or config.n_routed_experts % config.n_group:
        raise bad("n_group", f"a positive divisor of n_routed_experts={config.n_routed_experts}")
    if not 1 <= config.topk_group <= config.n_group:
        raise bad("topk_group", f"between 1 and n_group={config.n_group}")
    per_group = config.n_routed_experts // config.n_group
    if config.topk_method != "greedy" and config.topk_group * per_group < config.num_experts_per_tok:
        raise bad("num_experts_per_tok", f"at most topk_group * experts per group = {config.topk_group * per_group}")
    if config.topk_method == "noaux_tc" and per_group < 2 and config.n_group > 1:
        raise bad("n_group", "at most n_routed_experts / 2 with topk_method='noaux_tc' "
                             "(a group is scored by the sum of its two best experts)")
    if config.routed_scaling_factor <= 0:
        raise bad("routed_scaling_factor", "a positive number")

def _validate_rope_scaling(config: "ModelConfig") -> None:
    rs = config.rope_scaling
    if not isinstance(rs, dict) or rs.get("type", "yarn") != "yarn":
        raise ValueError(f"ModelConfig.rope_scaling={rs!r} is invalid: expected None or a YaRN dict "
                         f"{{'type': 'yarn', 'factor': ..., 'original_max_position_embeddings': ...}}")
    if not rs.get("factor") or rs["factor"] < 1:
        raise ValueError(f"ModelConfig.rope_scaling['factor']={rs.get('factor')!r} is invalid: expected >= 1")
    if not rs.get("original_max_position_embeddings"):
        raise ValueError("ModelConfig.rope_scaling['original_max_position_embeddings'] is missing: expected the "
                         "context length the model was pretrained at")


# ----- issue 21: multi-head attention and the families read as another's numerics -----
# model_type -> whether it uses MLA (True) or multi-head attention (False); the family a config.json is written
# back under (ModelConfig.family).
FAMILIES = {"glm4_moe_lite": True, "kimi_k2": True, "deepseek": False, "deepseek_ocr2_text": False,
            "deepseek_v2": None, "deepseek_v3": None}


def _validate_attention_choice(config: "ModelConfig") -> None:
    def bad(name: str, expected: str) -> ValueError:
        return ValueError(f"ModelConfig.{name}={getattr(config, name)!r} is invalid: expected {expected}")

    for name in ("use_mla", "attention_bias"):
        if not isinstance(getattr(config, name), bool):
            raise bad(name, "true or false")
    if config.family is not None and config.family not in FAMILIES:
        raise bad("family", f"None or one of {sorted(FAMILIES)}")
    wants_mla = FAMILIES.get(config.family)
    if wants_mla is not None and wants_mla != config.use_mla:
        raise bad("use_mla", f"{wants_mla} for a {config.family} model")
    if config.use_mla:
        if config.attention_bias:
            raise bad("attention_bias", "false with use_mla=True (MLA's projections have no biases here)")
        return
    if config.hidden_size % config.num_attention_heads:
        raise bad("num_attention_heads", f"a divisor of hidden_size={config.hidden_size} with use_mla=False "
                                         f"(each head is hidden_size / heads wide)")
    if config.mha_head_dim % 2:
        raise bad("num_attention_heads", f"a number of heads leaving an even head width with use_mla=False "
                                         f"(RoPE rotates pairs; hidden_size / heads = {config.mha_head_dim})")

def _validate_sparse_attention(config: "ModelConfig") -> None:
    """DeepSeek-V3.2's indexer fields (index_topk None: no indexer, the rest unread)."""
    def bad(name: str, expected: str) -> ValueError:
        return ValueError(f"ModelConfig.{name}={getattr(config, name)!r} is invalid: expected {expected}")

    def positive_int(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value > 0

    if config.index_topk is not None and not positive_int(config.index_topk):
        raise bad("index_topk", "None (dense MLA) or a positive integer (past tokens each query attends to)")
    for name in ("index_n_heads", "index_head_dim"):
        if not positive_int(getattr(config, name)):
            raise bad(name, "a positive integer")
    if config.index_topk is None:
        return
    if config.index_head_dim < config.qk_rope_head_dim:
        raise bad("index_head_dim", f"at least qk_rope_head_dim={config.qk_rope_head_dim} (the indexer rotates its "
                                    f"first qk_rope_head_dim dimensions)")
    if config.q_lora_rank is None:
        raise bad("q_lora_rank", "a positive integer with index_topk set (the indexer's queries come from the "
                                 "query latent)")
    if config.scoring_func != "sigmoid":
        raise bad("scoring_func", "'sigmoid' with index_topk set (DeepSeek-V3.2 routes as V3 does)")
    if not config.rope_interleave:
        raise bad("rope_interleave", "True with index_topk set (DeepSeek-V3.2 rotates interleaved pairs)")


MODALITIES = ("image", "text")  # the keys of modality_expert_groups
MAX_MODALITY_GROUPS = 63  # the router keeps each modality's groups as bits of one int64 (model/routing/deepseek.py)


def _validate_modality(config: "ModelConfig") -> None:
    """media_placeholder_token_id is a token id; modality_expert_groups splits the n_group router groups between
    image and text tokens, each side able to reach num_experts_per_tok experts."""
    token = config.media_placeholder_token_id
    if token is not None and (not isinstance(token, int) or isinstance(token, bool)
                              or not 0 <= token < config.vocab_size):
        raise ValueError(f"ModelConfig.media_placeholder_token_id={token!r} is invalid: expected None or a token id "
                         f"in [0, vocab_size={config.vocab_size})")
    groups = config.modality_expert_groups
    if groups is None:
        return

    def bad(expected: str) -> ValueError:
        return ValueError(f"ModelConfig.modality_expert_groups={groups!r} is invalid: expected {expected}")

    if not isinstance(groups, dict) or set(groups) != set(MODALITIES):
        raise bad('a dict {"image": [group ids], "text": [group ids]} (or None for one shared routing)')
    if config.n_routed_experts == 0 or config.router_type != "deepseek":
        raise bad("None unless the model has routed experts and router_type='deepseek' (modality-aware routing "
                  "restricts DeepSeek's group-limited routing)")
    G = config.n_group
    if not 2 <= G <= MAX_MODALITY_GROUPS:
        raise bad(f"n_group (now {G}) between 2 and {MAX_MODALITY_GROUPS}: each modality is given whole router "
                  f"groups")
    for name in MODALITIES:
        ids = groups[name]
        if (not isinstance(ids, list) or not ids
                or any(not isinstance(g, int) or isinstance(g, bool) or not 0 <= g < G for g in ids)):
            raise bad(f"{name!r}: a non-empty list of group ids in [0, n_group={G})")
        if len(set(ids)) != len(ids):
            raise bad(f"{name!r}: each group id once")
    shared = sorted(set(groups["image"]) & set(groups["text"]))
    if shared:
        raise bad(f"disjoint image and text groups (both hold {shared})")
    unused = sorted(set(range(G)) - set(groups["image"]) - set(groups["text"]))
    if unused:
        raise bad(f"every group 0..{G - 1} given to a modality (groups {unused} are in neither, so their experts "
                  f"would never be chosen)")
    if token is None:
        raise ValueError("ModelConfig.modality_expert_groups is set but media_placeholder_token_id is None: expected "
                         "the image placeholder token id that marks image tokens")
    per_group, k = config.n_routed_experts // G, config.num_experts_per_tok
    for name in MODALITIES:
        reach = len(groups[name]) if config.topk_method == "greedy" else min(len(groups[name]), config.topk_group)
        if k > reach * per_group:
            raise ValueError(f"ModelConfig.num_experts_per_tok={k} is invalid: expected at most {reach * per_group}, "
                             f"the experts a{'n' if name == 'image' else ''} {name} token can reach in "
                             f"{reach} of its groups {groups[name]} ({per_group} experts each)")
