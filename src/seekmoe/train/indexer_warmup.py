"""Training DeepSeek Sparse Attention as the DeepSeek-V3.2 report does (section 2.1.1), in two stages that continue a
trained model (`seekmoe train --init-from DIR --dsa-stage warmup|sparse`), each the ordinary Trainer with its own
objective and defaults:

- warmup: attention stays dense and every parameter but the lightning indexers' is frozen; the indexer learns the
  main attention's distribution (summed over heads, L1-normalized) by the KL divergence to its own softmax.
  (The report: lr 1e-3 for 1000 steps.)
- sparse: attention over the indexer's top-k; every parameter trains, the model by the language-model loss alone
  and the indexer by the KL over the tokens it selected alone: its inputs are detached from the model's graph
  (model/sparse_attention.py). Pretraining a V3.2 model from scratch uses this objective too.

The KL of the step (mean over queries and layers) is logged as `indexer_kl`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..model.moe import BalanceWindow
from ..model.sparse_attention import indexer_modules
from .step import Forward, language_model_forward

DSA_STAGES = ("warmup", "sparse")


def stage_defaults(stage: str, pretraining_final_lr: float) -> dict[str, Any]:
    """TrainConfig settings of a stage that `field=value` may still override: the warm-up trains the indexers only,
    at the report's constant 1e-3, with the routers' selection biases held (the main model must not move); the
    sparse stage continues at pretraining's final lr, constant, as a context extension does."""
    if stage == "warmup":
        return dict(trainable="indexer", lr=1e-3, warmup_steps=0, min_lr_ratio=1.0,
                    bias_update_speed_schedule=[[0.0, 0.0]])
    if stage == "sparse":
        return dict(lr=pretraining_final_lr, warmup_steps=0, min_lr_ratio=1.0)
    raise ValueError(f"--dsa-stage {stage!r} is invalid: expected one of {DSA_STAGES}")


def indexer_objective(stage: str) -> Forward:
    """The Trainer's objective for `stage`: the language-model forward, with the indexers' KL as the whole loss
    (warmup) or added to it (sparse); their inputs being detached, each part trains only its own parameters."""
    if stage not in DSA_STAGES:
        raise ValueError(f"--dsa-stage {stage!r} is invalid: expected one of {DSA_STAGES}")

    def forward(model: nn.Module, ids: torch.Tensor, device: torch.device, window: BalanceWindow | None,
                mtp_loss_weight: float | None = None):
        layers = indexer_modules(model)
        if not layers:
            raise ValueError("--dsa-stage needs a model with sparse attention: its config sets no index_topk "
                             "(a DeepSeek-V3.2 model has one)")
        for layer in layers:
            layer.indexer_stage = stage
            layer.indexer_loss = None
        out = language_model_forward(model, ids, device, window, mtp_loss_weight)
        losses = [layer.indexer_loss for layer in layers if layer.indexer_loss is not None]
        if losses:  # training mode (evaluation reports the language-model loss only)
            kl = torch.stack(losses).mean()
            out.metrics = {**getattr(out, "metrics", {}), "indexer_kl": kl.detach()}
            out.loss = kl if stage == "warmup" else out.loss + kl
            for layer in layers:
                layer.indexer_loss = None
        return out

    return forward
