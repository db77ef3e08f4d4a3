"""What `seekmoe expand` (grow/) wrote down about the experts it added, kept in config.json under `grown_experts`.

The trainer reads it back to train only the new experts (`--train new-experts`, see freeze.py) and to bring traffic
to them faster (onboarding.py); it is part of train/ so that training needs nothing of grow/. It lives in config.json
(ModelConfig.extra, which every save writes back unchanged) rather than in a sidecar file, so that it follows the
model through training runs and checkpoints; transformers ignores the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import ModelConfig

RECORD_KEY = "grown_experts"
# How far past the reach of the sigmoid scores (which span at most 1) an unselectable expert's bias is put.
UNSELECTABLE_MARGIN = 0.01


@dataclass
class GrowRecord:
    """Expert ids (in the expanded numbering) per MoE layer, keyed by the layer's module path (`model.layers.3.mlp`,
    `model.mtp.0.mlp`). `new` experts are to be trained; `dormant` ones fill the slots of layers that `--layers`
    left out (a config has one `n_routed_experts` for every layer): they start unselectable and stay so."""

    init: str
    new: dict[str, list[int]] = field(default_factory=dict)
    dormant: dict[str, list[int]] = field(default_factory=dict)
    unselectable_bias_margin: float = 0.0  # how far below reach the unselectable experts' selection bias was set

    def to_dict(self) -> dict:
        """The JSON-able form stored in config.json."""
        return {"init": self.init, "new": self.new, "dormant": self.dormant,
                "unselectable_bias_margin": self.unselectable_bias_margin}

    @classmethod
    def of(cls, config: ModelConfig) -> "GrowRecord | None":
        """The record in `config` (from its config.json), or None for a model that was never expanded."""
        raw = config.extra.get(RECORD_KEY)
        if raw is None:
            return None
        if not isinstance(raw, dict) or not isinstance(raw.get("new"), dict):
            raise ValueError(f"config.json key {RECORD_KEY!r} is malformed: expected {{'init', 'new': {{layer: "
                             f"[expert ids]}}, 'dormant': {{...}}}} as `seekmoe expand` writes it")
        return cls(init=str(raw.get("init", "?")),
                   new={k: [int(i) for i in v] for k, v in raw["new"].items()},
                   dormant={k: [int(i) for i in v] for k, v in (raw.get("dormant") or {}).items()},
                   unselectable_bias_margin=float(raw.get("unselectable_bias_margin", 0.0)))


def unselectable_bias(old_bias: torch.Tensor) -> torch.Tensor:
    """A selection bias that keeps an expert out of every top-k: sigmoid scores lie in [0, 1], so score + bias stays
    below every old expert's score + bias when the bias is more than 1 below the smallest old bias."""
    return old_bias.min() - 1.0 - UNSELECTABLE_MARGIN
