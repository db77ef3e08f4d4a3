"""Fully sharded data parallelism (FSDP2, `fully_shard`) of a seekmoe model over the run's mesh: one FSDP unit per
decoder block and MTP module, the routed experts of each MoE layer a unit of their own sharded over `dp_mod_ep`
only, and the root (embedding, final norm, LM head) last.

Two ways to shard the experts over `dp_mod_ep`, picked by what the installed torch offers: with
`DataParallelMeshDims` (newer torch) FSDP is told which dimension of the 2-D mesh is data-parallel; before it
existed (torch 2.11 has none), the experts become DTensors of the 1-D `ep` sub-mesh and FSDP shards them over the
sibling `dp_mod_ep` sub-mesh, FSDP2's 2-D (FSDP x TP/EP) composition, as torchtitan did. Both hold the same local
shards and save the same global tensors, so checkpoints move between them.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

try:
    from torch.distributed.fsdp import DataParallelMeshDims
except ImportError:  # torch without it: the experts go on the `ep` sub-mesh instead (module docstring)
    DataParallelMeshDims = None

from .mesh import ParallelConfig


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, config: ParallelConfig, world_size: int) -> None:
    """Shard `model` in place. With expert parallelism the experts' weights are already DTensors sharded over the
    mesh's `ep` dimension; FSDP shards them further over `dp_mod_ep`."""
    mixed = torch.cuda.is_available() if config.mixed_precision is None else config.mixed_precision
    # Every parameter but the routed experts' is a plain tensor, sharded over all ranks: the mesh flattened.
    dp_mesh = mesh._flatten("dp") if mesh.ndim > 1 else mesh
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed
              else MixedPrecisionPolicy())
    options = dict(mp_policy=policy, reshard_after_forward=config.reshard_after_forward)
    if mixed:
        # Routing stays fp32 (DeepSeek-V3; issue 16): each router is its own unit, gathered and computed in fp32
        # while the rest of the block runs in bf16. A router's weights (experts x hidden) are small; they stay
        # gathered until backward, as the root's do (below), which torch 2.11's FSDP2 needs.
        fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
        for moe in model.moe_layers():
            fully_shard(moe.gate, mesh=dp_mesh, mp_policy=fp32, reshard_after_forward=False)
    for moe in model.moe_layers():
        for provider in moe.experts.providers.values():
            # A weight provider's own parameters (the trainable rows of partly frozen experts) are plain tensors
            # holding every expert they concern on every rank: a unit of their own over all ranks. Their gradients
            # are then averaged over every rank, as the experts' must be (the ranks without the expert add zeros).
            if any(True for _ in provider.parameters(recurse=False)):
                fully_shard(provider, mesh=dp_mesh, **options)
    if config.ep > 1:
        for moe in model.moe_layers():
            if DataParallelMeshDims is not None:
                fully_shard(moe.experts, mesh=mesh, dp_mesh_dims=DataParallelMeshDims(shard="dp_mod_ep"),
                            **options)
            else:
                _move_experts_to_ep_submesh(moe.experts, mesh)
                fully_shard(moe.experts, mesh=mesh["dp_mod_ep"], **options)
            # Each rank's expert gradients already sum the tokens of its whole EP group (the all-to-all's backward
            # brings them home), so the mean over ranks must divide by every rank, while FSDP averages over the
            # dp_mod_ep ranks only: the missing 1/ep is applied in the experts' backward (a divide factor in FSDP
            # itself needs PREMUL_SUM, which gloo lacks).
            moe.experts.providers["shards"].grad_scale = 1.0 / config.ep
    for mtp in model.model.mtp:
        # The LM-head norm of an MTP module runs outside the module's forward (CausalLM.mtp_logits): a unit of its own.
        fully_shard(mtp.shared_head["norm"], mesh=dp_mesh, **options)
    for block in list(model.model.layers) + list(model.model.mtp):
        fully_shard(block, mesh=dp_mesh, **options)
    # The root (embedding, final norm, LM head) keeps its parameters gathered from forward to backward, which
    # backward needs first anyway. Resharded after forward, torch 2.11's FSDP2 reaches the LM head's backward with
    # its weights freed ("setStorage ... storage of size 0"), likely because the unit's output is a dataclass
    # (CausalLMOutput, RouterOutput) in which it finds no tensor to hang its pre-backward unshard on.
    fully_shard(model, mesh=dp_mesh, **{**options, "reshard_after_forward": False})


def _move_experts_to_ep_submesh(experts: nn.Module, mesh: DeviceMesh) -> None:
    """Re-wrap the experts' weights, DTensors on the 2-D mesh placed [Replicate(), Shard(0)], as DTensors of the
    1-D `ep` sub-mesh placed [Shard(0)]: the same local shard and global tensor, in the form older FSDP2 composes
    with a sibling data-parallel sub-mesh."""
    ep_mesh = mesh["ep"]
    for name in ("gate_up_proj", "down_proj"):
        weight = getattr(experts, name)
        local = weight.to_local() if isinstance(weight, DTensor) else weight.data
        shard = DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False)
        setattr(experts, name, nn.Parameter(shard, requires_grad=weight.requires_grad))
