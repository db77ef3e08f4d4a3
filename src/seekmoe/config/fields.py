"""ModelConfig: a DeepSeek-MoE model's shape, named field for field as in DeepSeek's Hugging Face `config.json`;
its validation (validation.py), config.json spellings (hf.py) and named presets (presets.py) live beside it."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .hf import config_from_hf_dict, config_to_hf_dict, mha_model_type
from .presets import PRESETS
from .validation import validate


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
    # --- Multi-head attention (issue 21; DeepSeekMoE 16B, DeepSeek-VL2-Tiny's and DeepSeek-OCR's language models):
    # use_mla=False replaces MLA by standard multi-head attention whose RoPE rotates the whole head
    # (hidden_size / num_attention_heads wide, `mha_head_dim`); the MLA ranks and head dims are then unused.
    use_mla: bool = True
    attention_bias: bool = False  # biases on the q/k/v/o projections (multi-head attention only)
    # --- Families with another family's numerics under their own model_type (issue 21): glm4_moe_lite and
    # kimi_k2 compute as deepseek_v3, deepseek (DeepSeekMoE's remote code) and deepseek_ocr2_text as multi-head
    # attention; config.json is written back under this name. None = the model_type the fields imply.
    family: str | None = None
    # DeepSeek-V4 (model_type deepseek_v4; transformers' DeepseekV4Config names): `layer_types` set = a V4 model.
    # Per-layer attention: "sliding_attention" (a window of `sliding_window` keys), "compressed_sparse_attention"
    # (the window plus the indexer's top-`index_topk` of the keys compressed every compress_rates[type] tokens) or
    # "heavily_compressed_attention" (the window plus every compressed key); one shared KV head of `head_dim`, its
    # last qk_rope_head_dim rotated (compressed branches with base compress_rope_theta and rope_scaling's YaRN),
    # a sink per head, the output through o_groups low-rank (o_lora_rank) groups. The residual is hc_mult streams
    # (mHC, Sinkhorn-normalized mixing); "hash_moe" layers of mlp_layer_types route by a fixed token->experts table.
    layer_types: list[str] | None = None
    compress_rates: dict | None = None  # {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
    compress_rope_theta: float = 160000.0
    head_dim: int = 512
    sliding_window: int = 128
    o_groups: int = 8
    o_lora_rank: int = 1024
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    mlp_layer_types: list[str] | None = None  # "hash_moe" or "moe" per layer
    swiglu_limit: float | None = None  # experts' gate clamped to <= limit, up to [-limit, limit] (V4: 10.0)
    extra: dict = field(default_factory=dict, repr=False)  # unknown config.json keys, written back unchanged
    # DeepSeek-V3.2's sparse attention (DSA, model_type deepseek_v32): in every attention layer a lightning indexer
    # of index_n_heads heads of index_head_dim scores each past token for each query, and MLA attends to the
    # index_topk best only (model/indexer.py, model/sparse_attention.py). index_topk None = dense MLA (V2/V3).
    # DeepSeek-V4's compressed sparse attention layers use the same three fields for their indexer (512 there).
    index_topk: int | None = None
    index_n_heads: int = 64
    index_head_dim: int = 128
    # Vision-language models (Kimi-K2.5's name): the token id standing for image features in input_ids; the image
    # features replace its embeddings, and modality-aware routing counts a token as an image token by it.
    media_placeholder_token_id: int | None = None
    # Modality-aware routing (MoMa-style expert groups; seekmoe's own key): {"image": [group ids], "text": [group
    # ids]}, a partition of the n_group router groups. Image tokens (== media_placeholder_token_id) choose only
    # among the image groups' experts, every other token among the text groups'; None = one shared routing.
    modality_expert_groups: dict | None = None

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
        if self.is_v4:
            return "deepseek_v4"
        if self.router_type != "deepseek" or self.eval_capacity() > 0 or self.modality_expert_groups:
            return f"seekmoe_{self.router_type}"
        if self.family is not None:
            return self.family
        if not self.use_mla:
            return mha_model_type(self)
        if self.index_topk is not None:
            return "deepseek_v32"
        return "deepseek_v3" if self.scoring_func == "sigmoid" else "deepseek_v2"

    @property
    def is_v4(self) -> bool:
        """A DeepSeek-V4 model (per-layer compressed attention, hyper-connections): `layer_types` is set."""
        return self.layer_types is not None

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
    def mha_head_dim(self) -> int:
        """Query/key/value width per head of multi-head attention (use_mla=False): hidden_size / heads."""
        return self.hidden_size // self.num_attention_heads

    @property
    def rope_head_dim(self) -> int:
        """How many dimensions of each query/key head RoPE rotates: MLA's decoupled rope part, or the whole head."""
        return self.qk_rope_head_dim if self.use_mla else self.mha_head_dim

    @property
    def n_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))

    # ----- presets and config.json -----
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """A named configuration (see presets.PRESETS), with fields optionally overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}: expected one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def validate(self) -> None:
        """Raise ValueError naming the first field whose value cannot describe a model (validation.py)."""
        validate(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Read a DeepSeek-V2/V3 config.json dict (hf.py)."""
        return config_from_hf_dict(cls, d)

    def to_dict(self) -> dict:
        """A config.json dict that transformers' AutoConfig reads as DeepseekV2Config or DeepseekV3Config (hf.py)."""
        return config_to_hf_dict(self)

    @classmethod
    def from_json_file(cls, path: str | Path) -> "ModelConfig":
        """Read `path` (a config.json, or a directory holding one), refusing a hostile one before it allocates
        anything (model_folder.py: size, nesting, a JSON object, bounded sizes)."""
        from ..model_folder import read_model_config

        return read_model_config(path)

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
