"""How a plain seekmoe model runs, applied from outside (the model knows no ranks): torchrun's processes and their
DeviceMesh (mesh.py), expert parallelism with all-to-all token dispatch (expert_parallel.py), FSDP2 sharding
(fsdp.py), and activation checkpointing, compile and the experts' backend (compile.py)."""

import torch
from torch import nn

from .compile import apply_activation_checkpointing, apply_compute_options, compile_blocks
from .consolidate import consolidated_model
from .expert_parallel import AllToAllDispatcher, apply_expert_parallel
from .fsdp import apply_fsdp
from .mesh import ParallelConfig, Processes, check_node_limited_routing, init_processes, launched_by_torchrun


def parallelize(model: nn.Module, processes: Processes, config: ParallelConfig, *,
                activation_checkpointing: bool = False, compile: bool = False,
                compute_dtype: torch.dtype | None = None) -> nn.Module:
    """Apply expert parallelism (when config.ep > 1) and FSDP2 on `processes`' mesh (several processes), then
    activation checkpointing and compile (see compile.py), to `model`; returns it. `compute_dtype` is autocast's
    dtype when the run uses autocast (it picks the experts' backend)."""
    if processes.distributed:
        if config.ep > 1:
            apply_expert_parallel(model, processes.mesh)
        apply_fsdp(model, processes.mesh, config, processes.world_size)
    apply_compute_options(model, activation_checkpointing=activation_checkpointing, compile=compile,
                          compute_dtype=compute_dtype)
    return model


__all__ = ["AllToAllDispatcher", "consolidated_model", "ParallelConfig", "Processes", "apply_activation_checkpointing",
           "apply_compute_options", "apply_expert_parallel", "apply_fsdp", "check_node_limited_routing",
           "compile_blocks", "init_processes", "launched_by_torchrun", "parallelize"]
