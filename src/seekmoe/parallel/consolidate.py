"""Gathering a parallelized model back into one plain model, for `final/` in the Hugging Face layout."""

from __future__ import annotations

import logging

from torch import nn

from ..config import ModelConfig
from ..model.experts import fold_weight_providers


def consolidated_model(model: nn.Module, config: ModelConfig, rank: int) -> nn.Module | None:
    """Every rank calls this (it gathers every shard): the full model with plain CPU tensors on rank 0, None on the
    others. Expert-parallel weights come back as the full [n_routed_experts, ...] stacks, so the saved keys are
    the usual per-expert ones."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from .. import build_model

    # Gathering 2-D expert shards makes DTensor warn that it needs two all-gathers: true, harmless, once per run.
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return None
    # Weight providers' own tensors (the trainable rows of partly frozen experts) go back into the plain stacks.
    fold_weight_providers(model, state)
    plain = build_model(config)
    plain.load_state_dict(state)
    return plain
