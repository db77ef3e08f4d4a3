"""Activation checkpointing, torch.compile and the routed experts' backend, applied to a plain seekmoe model from
outside by `parallelize`, like expert parallelism and FSDP (torchtitan's order: parallelism, then checkpointing,
then compile)."""

from __future__ import annotations

import torch
from torch import nn

from ..model.experts import configure_experts


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder block's activations in the backward instead of keeping them (in training mode): the
    model checkpoints every block call, outside any compiled block graph."""
    model.gradient_checkpointing = True


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
