"""What a LoRA (or QLoRA) run adapts: rank, alpha, dropout, targets, base-weight quantization, and the checks that
refuse a setting before anything is written.

A run's settings live in TrainConfig's `lora` section (`lora.rank=8`, or `--lora 8` on the command line), so a
resumed run rebuilds the same adapters.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..config import ModelConfig

TARGETS = ("attention", "shared-experts", "experts", "dense-mlp", "router")
DEFAULT_TARGETS = "attention,shared-experts,experts,dense-mlp"
QUANTIZE = ("none", "nf4")


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA settings: W' = W + (alpha / rank) * B @ A on every targeted weight, B [out, rank] starting at zero,
    A [rank, in] at random. `router` trains the routers' weights in full (they are n_routed_experts x hidden: a
    low-rank factor of them saves nothing). `quantize='nf4'` keeps the frozen base weights in 4-bit NormalFloat
    (QLoRA) through torchao."""

    rank: int
    alpha: float | None = None  # None: 2 * rank (scaling 2, a common choice)
    dropout: float = 0.0
    targets: str = DEFAULT_TARGETS
    quantize: str = "none"

    @classmethod
    def from_dict(cls, section: dict) -> "LoRAConfig":
        """The settings of TrainConfig's `lora` section; ValueError naming the first bad key or value."""
        unknown = sorted(set(section) - {"rank", "alpha", "dropout", "targets", "quantize"})
        if unknown:
            raise ValueError(f"lora.{unknown[0]} is not a LoRA setting: expected rank, alpha, dropout, targets or "
                             f"quantize")
        if "rank" not in section:
            raise ValueError("the lora section has no rank: give --lora RANK (or lora.rank=RANK)")
        config = cls(**section)
        config.validate()
        return config

    def to_dict(self) -> dict:
        """The fields as a JSON-able dict."""
        return asdict(self)

    @property
    def lora_alpha(self) -> float:
        """alpha, its default filled in."""
        return float(2 * self.rank if self.alpha is None else self.alpha)

    @property
    def scaling(self) -> float:
        """alpha / rank, what B @ A is multiplied by."""
        return self.lora_alpha / self.rank

    @property
    def target_set(self) -> tuple[str, ...]:
        """The targets as a tuple of TARGETS names."""
        return tuple(t.strip() for t in str(self.targets).split(",") if t.strip())

    def validate(self) -> None:
        """Raise ValueError naming the first setting that cannot run (the model's widths: `check_widths`)."""
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"--lora {self.rank!r} is invalid: expected a rank >= 1")
        if self.alpha is not None and (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float))
                                       or not self.alpha > 0 or self.alpha == float("inf")):
            raise ValueError(f"--lora-alpha {self.alpha!r} is invalid: expected a finite number > 0")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"--lora-dropout {self.dropout!r} is invalid: expected a number in [0, 1)")
        targets = self.target_set
        if not targets:
            raise ValueError(f"--lora-targets {self.targets!r} is empty: expected some of {', '.join(TARGETS)}")
        for target in targets:
            if target not in TARGETS:
                raise ValueError(f"--lora-targets: unknown target {target!r}: expected some of {', '.join(TARGETS)}, "
                                 f"comma-separated")
        if targets == ("router",):
            raise ValueError("--lora-targets router alone trains no adapter: add attention, shared-experts, experts "
                             "or dense-mlp")
        if self.dropout and set(targets) - {"attention", "router"}:
            # PEFT runs adapters of whole weight tensors (target_parameters: the fused experts, and here the MLPs)
            # without dropout, which cannot be factored out of x @ (W + BA); its adapter_config has one dropout.
            raise ValueError(f"--lora-dropout {self.dropout} needs --lora-targets attention (and router) only: PEFT "
                             f"adapts expert and MLP weights as parameters, which take no dropout")
        if self.quantize not in QUANTIZE:
            raise ValueError(f"--quantize {self.quantize!r} is invalid for LoRA training: expected one of "
                             f"{', '.join(QUANTIZE)}")

    def check_widths(self, config: ModelConfig) -> None:
        """ValueError when the rank exceeds the narrower side of a targeted weight of the model `config` (a rank
        above it adds parameters and no expressiveness); also checks the model has something to adapt."""
        for name, (rows, cols) in targeted_shapes(config, self.target_set).items():
            if self.rank > min(rows, cols):
                raise ValueError(f"--lora {self.rank} is above the width of {name} ({rows} x {cols}): expected a "
                                 f"rank <= {min(rows, cols)}")
        if not targeted_shapes(config, self.target_set):
            raise ValueError(f"--lora-targets {self.targets!r} names nothing this model has (no MoE layers, or no "
                             f"dense ones)")


def targeted_shapes(config: ModelConfig, targets: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """{a weight's name: (out, in)} for each kind of weight the targets adapt (one per kind, from config arithmetic)."""
    H, h = config.hidden_size, config.num_attention_heads
    shapes: dict[str, tuple[int, int]] = {}
    if "attention" in targets and not config.use_mla:  # multi-head attention: q/k/v/o, heads x mha_head_dim
        width = h * config.mha_head_dim
        shapes.update({"self_attn.q_proj": (width, H), "self_attn.k_proj": (width, H),
                       "self_attn.v_proj": (width, H), "self_attn.o_proj": (H, width)})
    elif "attention" in targets:  # MLA (V3.2's indexer is not adapted)
        if config.q_lora_rank is None:
            shapes["self_attn.q_proj"] = (h * config.qk_head_dim, H)
        else:
            shapes["self_attn.q_a_proj"] = (config.q_lora_rank, H)
            shapes["self_attn.q_b_proj"] = (h * config.qk_head_dim, config.q_lora_rank)
        shapes["self_attn.kv_a_proj_with_mqa"] = (config.kv_lora_rank + config.qk_rope_head_dim, H)
        shapes["self_attn.kv_b_proj"] = (h * (config.qk_nope_head_dim + config.v_head_dim), config.kv_lora_rank)
        shapes["self_attn.o_proj"] = (H, h * config.v_head_dim)
    has_moe = config.n_moe_layers > 0
    if "experts" in targets and has_moe:
        shapes["mlp.experts.down_proj"] = (H, config.moe_intermediate_size)
    if "shared-experts" in targets and has_moe and config.n_shared_experts:
        shapes["mlp.shared_experts.down_proj"] = (H, config.moe_intermediate_size * config.n_shared_experts)
    if "dense-mlp" in targets and config.num_hidden_layers > config.n_moe_layers:
        shapes["mlp.down_proj"] = (H, config.intermediate_size)
    return shapes
