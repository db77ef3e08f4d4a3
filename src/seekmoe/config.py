"""ModelConfig: a DeepSeek-MoE model's shape, named field for field as in DeepSeek's Hugging Face `config.json`."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

SCORING_FUNCS = ("softmax", "sigmoid")
# greedy: plain top-k (V2-Lite); group_limited_greedy: groups scored by their best expert (V2);
# noaux_tc: groups scored by the sum of their two best experts, bias-corrected selection (V3).
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
# deepseek: the router above (the default); the others are the MoE literature's, for comparison (model/routing/).
ROUTER_TYPES = ("deepseek", "switch", "gshard", "noisy_topk", "hash", "hierarchical")
ROPE_SCALING_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")


@dataclass
class ModelConfig:
    """Architecture and training-objective settings of a DeepSeek-V2/V3-style MoE causal language model."""

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432  # dense MLP width (the first_k_dense_replace layers)
    moe_intermediate_size: int = 2048  # width of one routed (and one shared) expert
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 3
    num_attention_heads: int = 128
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rope_theta: float = 10000.0
    # YaRN: {"type": "yarn", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
    # "mscale_all_dim"}; None for plain RoPE.
    rope_scaling: dict | None = None
    rope_interleave: bool = True  # DeepSeek's weights rotate adjacent pairs (x0, x1), (x2, x3), ...
    max_position_embeddings: int = 4096
    num_nextn_predict_layers: int = 1  # MTP depth D
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.006
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    # Training-side knobs (not read by transformers; kept in config.json under the same names).
    aux_loss_alpha: float = 0.0001  # sequence-wise balance loss weight (V3's alpha)
    expert_balance_alpha: float = 0.0  # DeepSeekMoE expert-level balance loss weight (alpha_1)
    device_balance_alpha: float = 0.0  # DeepSeekMoE device-level balance loss weight (alpha_2); devices = groups
    router_z_loss_coef: float = 0.0
    bias_update_speed: float = 0.001  # gamma of auxiliary-loss-free balancing
    mtp_loss_weight: float = 0.3  # lambda
    # Routers of the MoE literature (seekmoe's own keys; a non-DeepSeek router writes a model_type transformers
    # does not know, so transformers refuses the checkpoint instead of running it with the wrong router).
    router_type: str = "deepseek"  # one of ROUTER_TYPES
    # Expert capacity = capacity_factor * tokens * top_k / experts; overflow slots are dropped (the token passes
    # through the residual). None = the router's default: 1.25 in training and 2.0 in evaluation for switch and
    # gshard (Switch Transformer), dropless (0) for the others; 0 = dropless.
    capacity_factor: float | None = None
    eval_capacity_factor: float | None = None
    router_jitter: float = 0.0  # Switch: router inputs times U(1 - eps, 1 + eps) in training (learned routers)
    # Weight of the literature routers' balance loss (Switch/GShard's E * sum f_i P_i, noisy top-k's and the
    # hierarchical gate's importance/load CV^2). None = 0.01 for switch/gshard, 0.1 for noisy_topk/hierarchical.
    # (aux_loss_alpha, expert_balance_alpha, device_balance_alpha and bias_update_speed are the DeepSeek router's.)
    router_aux_loss_coef: float | None = None
    second_expert_threshold: float = 0.2  # GShard: the 2nd expert is kept with probability min(1, g2 / threshold)
    extra: dict = field(default_factory=dict, repr=False)  # unknown config.json keys, written back unchanged

    def __post_init__(self) -> None:
        self.validate()

    # ----- derived sizes -----
    @property
    def qk_head_dim(self) -> int:
        """Query/key width per head: the position-free part plus the decoupled rope part."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def model_type(self) -> str:
        """The transformers model type whose numerics this config matches; `seekmoe_<router_type>` (unknown to
        transformers, which then refuses the checkpoint) when no transformers model computes what this one does."""
        if self.router_type != "deepseek" or self.eval_capacity() > 0:
            return f"seekmoe_{self.router_type}"
        return "deepseek_v3" if self.scoring_func == "sigmoid" else "deepseek_v2"

    def train_capacity(self) -> float:
        """The capacity factor in training (0 = dropless), after the router type's default."""
        if self.capacity_factor is not None:
            return float(self.capacity_factor)
        return 1.25 if self.router_type in ("switch", "gshard") else 0.0

    def eval_capacity(self) -> float:
        """The capacity factor in evaluation and inference (0 = dropless), after the router type's default."""
        if self.eval_capacity_factor is not None:
            return float(self.eval_capacity_factor)
        return 2.0 if self.router_type in ("switch", "gshard") else 0.0

    def router_aux_loss(self) -> float:
        """The literature routers' balance loss weight, after the router type's default."""
        if self.router_aux_loss_coef is not None:
            return float(self.router_aux_loss_coef)
        return {"switch": 0.01, "gshard": 0.01, "noisy_topk": 0.1, "hierarchical": 0.1}.get(self.router_type, 0.0)

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether decoder layer `layer_idx` holds a MoE (True) or a dense MLP (False)."""
        return self.n_routed_experts > 0 and layer_idx >= self.first_k_dense_replace

    @property
    def n_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))

    # ----- validation -----
    def validate(self) -> None:
        """Raise ValueError naming the first field whose value cannot describe a model."""

        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"ModelConfig.{name}={getattr(self, name)!r} is invalid: expected {expected}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "kv_lora_rank", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise bad(name, "a positive integer")
        for name in ("n_routed_experts", "n_shared_experts", "qk_nope_head_dim", "num_nextn_predict_layers",
                     "first_k_dense_replace"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise bad(name, "a non-negative integer")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            raise bad("q_lora_rank", "a positive integer, or None for a full-rank query projection")
        if self.qk_rope_head_dim % 2:
            raise bad("qk_rope_head_dim", "an even number (RoPE rotates pairs of dimensions)")
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise bad("first_k_dense_replace", f"at most num_hidden_layers={self.num_hidden_layers}")
        if self.scoring_func not in SCORING_FUNCS:
            raise bad("scoring_func", f"one of {SCORING_FUNCS}")
        if self.topk_method not in TOPK_METHODS:
            raise bad("topk_method", f"one of {TOPK_METHODS}")
        if self.rms_norm_eps <= 0:
            raise bad("rms_norm_eps", "a positive number")
        if self.n_routed_experts > 0:
            self._validate_routing()
        if self.rope_scaling is not None:
            self._validate_rope_scaling()
        for name in ("aux_loss_alpha", "expert_balance_alpha", "device_balance_alpha", "router_z_loss_coef",
                     "bias_update_speed", "mtp_loss_weight"):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) < 0:
                raise bad(name, "a non-negative number")
        self._validate_router_type()

    def _validate_router_type(self) -> None:
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"ModelConfig.{name}={getattr(self, name)!r} is invalid: expected {expected}")

        if self.router_type not in ROUTER_TYPES:
            raise bad("router_type", f"one of {ROUTER_TYPES}")
        for name in ("capacity_factor", "eval_capacity_factor", "router_aux_loss_coef"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0):
                raise bad(name, "None (the router's default) or a non-negative number (0 = off)")
        if not isinstance(self.router_jitter, (int, float)) or not 0 <= self.router_jitter < 1:
            raise bad("router_jitter", "a number in [0, 1)")
        if not isinstance(self.second_expert_threshold, (int, float)) or self.second_expert_threshold <= 0:
            raise bad("second_expert_threshold", "a positive number")
        if self.router_type == "deepseek":
            if self.router_jitter:
                raise bad("router_jitter", "0 with router_type='deepseek' (jitter belongs to the literature routers)")
            return
        if self.n_routed_experts == 0:
            raise bad("router_type", "'deepseek' for a dense model (n_routed_experts=0)")
        for name in ("expert_balance_alpha", "device_balance_alpha"):
            if getattr(self, name):
                raise bad(name, f"0 with router_type={self.router_type!r}: DeepSeekMoE's balance losses belong to "
                                f"router_type='deepseek'; set router_aux_loss_coef instead")
        k, E = self.num_experts_per_tok, self.n_routed_experts
        if self.router_type in ("switch", "hash") and k != 1:
            raise bad("num_experts_per_tok", f"1 with router_type={self.router_type!r} (one expert per token)")
        if self.router_type == "gshard" and k != 2:
            raise bad("num_experts_per_tok", "2 with router_type='gshard' (top-2 gating)")
        if self.router_type == "noisy_topk" and k >= E:
            raise bad("num_experts_per_tok", f"fewer than n_routed_experts={E} with router_type='noisy_topk' "
                                             f"(the load loss needs the (k+1)-th noisy logit)")
        if self.router_type == "hierarchical":
            if self.n_group < 2 or E % self.n_group:
                raise bad("n_group", f"a divisor of n_routed_experts={E} and at least 2 with "
                                     f"router_type='hierarchical' (the primary gate picks among n_group groups)")
            if k % self.topk_group or k // self.topk_group > E // self.n_group:
                raise bad("num_experts_per_tok", f"topk_group={self.topk_group} times the experts picked per group "
                                                 f"(at most {E // self.n_group}) with router_type='hierarchical'")

    def _validate_routing(self) -> None:
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"ModelConfig.{name}={getattr(self, name)!r} is invalid: expected {expected}")

        if self.moe_intermediate_size <= 0:
            raise bad("moe_intermediate_size", "a positive integer")
        if not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
            raise bad("num_experts_per_tok", f"between 1 and n_routed_experts={self.n_routed_experts}")
        if self.n_group < 1 or self.n_routed_experts % self.n_group:
            raise bad("n_group", f"a positive divisor of n_routed_experts={self.n_routed_experts}")
        if not 1 <= self.topk_group <= self.n_group:
            raise bad("topk_group", f"between 1 and n_group={self.n_group}")
        per_group = self.n_routed_experts // self.n_group
        if self.topk_method != "greedy" and self.topk_group * per_group < self.num_experts_per_tok:
            raise bad("num_experts_per_tok", f"at most topk_group * experts per group = {self.topk_group * per_group}")
        if self.topk_method == "noaux_tc" and per_group < 2 and self.n_group > 1:
            raise bad("n_group", "at most n_routed_experts / 2 with topk_method='noaux_tc' "
                                 "(a group is scored by the sum of its two best experts)")
        if self.routed_scaling_factor <= 0:
            raise bad("routed_scaling_factor", "a positive number")

    def _validate_rope_scaling(self) -> None:
        rs = self.rope_scaling
        if not isinstance(rs, dict) or rs.get("type", "yarn") != "yarn":
            raise ValueError(f"ModelConfig.rope_scaling={rs!r} is invalid: expected None or a YaRN dict "
                             f"{{'type': 'yarn', 'factor': ..., 'original_max_position_embeddings': ...}}")
        if not rs.get("factor") or rs["factor"] < 1:
            raise ValueError(f"ModelConfig.rope_scaling['factor']={rs.get('factor')!r} is invalid: expected >= 1")
        if not rs.get("original_max_position_embeddings"):
            raise ValueError("ModelConfig.rope_scaling['original_max_position_embeddings'] is missing: expected the "
                             "context length the model was pretrained at")

    # ----- presets -----
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """A named configuration (see PRESETS), with fields optionally overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}: expected one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    # ----- config.json -----
    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Read a DeepSeek-V2/V3 config.json dict (transformers 4.x `rope_scaling` or 5.x `rope_parameters`)."""
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

    @classmethod
    def from_json_file(cls, path: str | Path) -> "ModelConfig":
        """Read `path` (a config.json, or a directory holding one), refusing a hostile one before it allocates
        anything (model_folder.py: size, nesting, a JSON object, bounded sizes)."""
        from .model_folder import read_model_config

        return read_model_config(path)

    def to_dict(self) -> dict:
        """A config.json dict that transformers' AutoConfig reads as DeepseekV2Config or DeepseekV3Config."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        d = {**self.extra, **d}
        for key, default in _ROUTER_DEFAULTS.items():  # DeepSeek-router configs stay as they were
            if d.get(key) == default:
                d.pop(key)
        d["model_type"] = self.model_type
        d["architectures"] = ({"deepseek_v3": ["DeepseekV3ForCausalLM"], "deepseek_v2": ["DeepseekV2ForCausalLM"]}
                              .get(self.model_type, ["SeekMoEForCausalLM"]))
        d["hidden_act"] = "silu"
        d["num_key_value_heads"] = self.num_attention_heads
        d["moe_layer_freq"] = 1
        d.pop("rope_interleave")
        if self.model_type != "deepseek_v2":
            d["rope_interleave"] = self.rope_interleave
        elif not self.rope_interleave:
            raise ValueError("ModelConfig.rope_interleave=False cannot be written as a deepseek_v2 config: "
                             "DeepSeek-V2 always rotates interleaved pairs")
        # Both spellings of the rope settings: transformers 4.x reads rope_theta/rope_scaling, 5.x rope_parameters.
        if self.rope_scaling:
            d["rope_parameters"] = {"rope_type": "yarn", "rope_theta": self.rope_theta,
                                    **{k: v for k, v in self.rope_scaling.items() if k != "type"}}
        else:
            d["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
        return d

    def save(self, directory: str | Path) -> None:
        """Write `directory/config.json`."""
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "config.json").write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)

    def yarn_mscale(self) -> float:
        """YaRN's softmax scale correction mscale(factor, mscale_all_dim)^2 applied to the attention logits."""
        rs = self.rope_scaling
        if not rs or not rs.get("mscale_all_dim"):
            return 1.0
        m = yarn_get_mscale(rs["factor"], rs["mscale_all_dim"])
        return m * m


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature 0.1 * mscale * ln(scale) + 1 (1 when not extending)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


# Keys transformers writes that follow from other fields; read and recomputed, never stored twice.
_DERIVED_KEYS = {"model_type", "architectures", "hidden_act", "num_key_value_heads", "qk_head_dim", "head_dim",
                 "moe_layer_freq", "transformers_version", "torch_dtype", "dtype", "auto_map", "use_cache"}

# The router fields' defaults, left out of config.json (a DeepSeek-router model's config.json lists DeepSeek's keys).
_ROUTER_DEFAULTS = {"router_type": "deepseek", "capacity_factor": None, "eval_capacity_factor": None,
                    "router_jitter": 0.0, "router_aux_loss_coef": None, "second_expert_threshold": 0.2}

_YARN_40X = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1}

PRESETS: dict[str, dict[str, Any]] = {
    # For tests: every feature on (q-LoRA, groups, shared experts, a dense layer, MTP), well under 1M parameters.
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                 num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=4, n_routed_experts=8,
                 n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2, q_lora_rank=32,
                 kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                 max_position_embeddings=512, num_nextn_predict_layers=1, initializer_range=0.02),
    # Learns Python-flavoured text on 2 CPU cores in minutes (`make demo`); sized for a CPU without native bf16.
    "small": dict(vocab_size=2048, hidden_size=128, intermediate_size=384, moe_intermediate_size=64,
                  num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, n_routed_experts=16,
                  n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2, q_lora_rank=None,
                  kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=32,
                  max_position_embeddings=1024, num_nextn_predict_layers=1, initializer_range=0.02,
                  bias_update_speed=0.01),  # gamma: a few hundred steps, not V3's ~1M, to balance in
    "deepseek-v2-lite": dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
                             num_hidden_layers=27, first_k_dense_replace=1, num_attention_heads=16,
                             n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1,
                             topk_method="greedy", scoring_func="softmax", routed_scaling_factor=1.0,
                             norm_topk_prob=False, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
                             qk_rope_head_dim=64, v_head_dim=128, max_position_embeddings=163840,
                             rope_scaling={**_YARN_40X, "mscale": 0.707, "mscale_all_dim": 0.707},
                             num_nextn_predict_layers=0, bos_token_id=100000, eos_token_id=100001,
                             aux_loss_alpha=0.001),
    "deepseek-v2": dict(vocab_size=102400, hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536,
                        num_hidden_layers=60, first_k_dense_replace=1, num_attention_heads=128,
                        n_routed_experts=160, n_shared_experts=2, num_experts_per_tok=6, n_group=8, topk_group=3,
                        topk_method="group_limited_greedy", scoring_func="softmax", routed_scaling_factor=16.0,
                        norm_topk_prob=False, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                        qk_rope_head_dim=64, v_head_dim=128, max_position_embeddings=163840,
                        rope_scaling={**_YARN_40X, "mscale": 0.707, "mscale_all_dim": 0.707},
                        num_nextn_predict_layers=0, bos_token_id=100000, eos_token_id=100001, aux_loss_alpha=0.003),
    "deepseek-v3": dict(max_position_embeddings=163840,
                        rope_scaling={**_YARN_40X, "mscale": 1.0, "mscale_all_dim": 1.0}),
}
# Dense counterparts (every layer a SwiGLU FFN) for `seekmoe upcycle` (grow/upcycle.py).
PRESETS["tiny-dense"] = {**PRESETS["tiny"], "n_routed_experts": 0, "first_k_dense_replace": 2}
PRESETS["small-dense"] = {**PRESETS["small"], "n_routed_experts": 0, "first_k_dense_replace": 3}
# DeepSeekMoE 16B's expert layout (64 routed, 6 active, 2 shared) and depth, 4K context. seekmoe implements MLA
# only, so its attention is MLA with DeepSeek-V2-Lite's ranks instead of the original's 16-head MHA.
PRESETS["deepseek-moe-16b"] = {**PRESETS["deepseek-v2-lite"], "num_hidden_layers": 28,
                               "max_position_embeddings": 4096, "rope_scaling": None}
