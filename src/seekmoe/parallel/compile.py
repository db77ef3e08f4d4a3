"""Activation checkpointing, torch.compile and the routed experts' backend, applied to a plain seekmoe model from
outside by `parallelize`, like expert parallelism and FSDP (torchtitan's order: parallelism, then checkpointing,
then compile)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..model.experts import configure_experts


class CheckpointedForward:
    """A decoder block's forward that, in training mode, keeps only its inputs and recomputes its activations in the
    backward (non-reentrant torch.utils.checkpoint); in eval mode (scoring, decoding with a cache) it is the block's
    own forward. Set as the block's instance `forward` rather than wrapping the block in a module: parameter names,
    `isinstance` and state-dict keys stay the model's own, which materialize, LoRA, freezing and DCP rely on."""

    def __init__(self, block: nn.Module):
        self.block = block

    def __call__(self, *args, **kwargs):
        block = self.block
        forward = type(block).forward  # the class's (FSDP2's subclass inherits it)
        if not block.training:
            return forward(block, *args, **kwargs)
        return checkpoint(forward, block, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder block's activations in the backward instead of keeping them (in training mode), by
    giving every block of `model.model.layers` a `CheckpointedForward` (again is a no-op). The block's hooks (FSDP2's
    unshard) stay outside the checkpoint and a compiled block compiles it into its graph, as torchtitan applies them."""
    for block in model.model.layers:
        block.forward = CheckpointedForward(block)


def compile_blocks(model: nn.Module, backend: str = "inductor") -> None:
    """torch.compile each decoder block and MTP module in place, as torchtitan does: FSDP2's hooks stay outside
    the compiled graphs, and one graph per block shape is compiled once however deep the model is. The routed
    experts run as one opaque operator inside each graph (see model/experts.py), so a block is a single graph."""
    for block in list(model.model.layers) + list(model.model.mtp):
        block.compile(backend=backend)


def apply_compute_options(model: nn.Module, *, activation_checkpointing: bool = False, compile: bool = False,
                          compute_dtype: torch.dtype | None = None, compile_backend: str = "inductor") -> None:
    """Activation checkpointing, compile, and the experts' backend chosen for what the model will run as (compiled
    or not, computing in `compute_dtype`: autocast's, when it differs from the parameters')."""
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    configure_experts(model, dtype=compute_dtype, compiled=compile)
    if compile:
        compile_blocks(model, compile_backend)
