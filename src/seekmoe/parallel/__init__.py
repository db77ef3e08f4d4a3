"""Multi-process training, applied to a plain seekmoe model from outside (the model knows no ranks): torchrun's
processes and their DeviceMesh (mesh.py), expert parallelism with all-to-all token dispatch (expert_parallel.py),
and FSDP2 sharding (fsdp.py)."""

from torch import nn

from .consolidate import consolidated_model
from .expert_parallel import AllToAllDispatcher, apply_expert_parallel
from .fsdp import apply_fsdp
from .mesh import ParallelConfig, Processes, check_node_limited_routing, init_processes, launched_by_torchrun


def parallelize(model: nn.Module, processes: Processes, config: ParallelConfig) -> nn.Module:
    """Apply expert parallelism (when config.ep > 1), then FSDP2, to `model` on `processes`' mesh; returns it."""
    if not processes.distributed:
        return model
    if config.ep > 1:
        apply_expert_parallel(model, processes.mesh)
    apply_fsdp(model, processes.mesh, config, processes.world_size)
    return model


__all__ = ["AllToAllDispatcher", "consolidated_model", "ParallelConfig", "Processes", "apply_expert_parallel", "apply_fsdp",
           "check_node_limited_routing", "init_processes", "launched_by_torchrun", "parallelize"]
