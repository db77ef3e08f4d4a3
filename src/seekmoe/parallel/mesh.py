"""Processes and their mesh: reading torchrun's environment, the parallelism settings, and the DeviceMesh.

The mesh is 2-D, `[dp_mod_ep, ep]` over the world's ranks (rank = i * ep + j), the layout torchtitan uses for expert
parallelism carved out of data parallelism:
- every rank reads its own data (data parallelism over all W ranks);
- the `ep` ranks of one row (consecutive ranks, so one node's GPUs) each hold n_routed_experts / ep of the routed
  experts and exchange tokens all-to-all;
- every other parameter is FSDP-sharded over all W ranks (the flattened mesh), the routed experts over the
  `dp_mod_ep` column only (the ranks that hold the same experts).
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..config import ModelConfig


@dataclass
class ParallelConfig:
    """How a run is spread over processes (`parallel.FIELD=VALUE` on the `seekmoe train` command line)."""

    ep: int = 1  # expert-parallel size: ranks that split the routed experts between them (divides the world size)
    node_limit: int = 0  # DeepSeek-V3's node-limited routing: each token's experts on at most this many EP ranks
    mixed_precision: bool | None = None  # FSDP2 bf16 compute with fp32 gradient reduction; None = on CUDA only
    reshard_after_forward: bool = True  # FSDP2: free gathered parameters after each block's forward (ZeRO-3)

    @classmethod
    def from_dict(cls, d: dict | None) -> "ParallelConfig":
        """From the `parallel` mapping of a TrainConfig; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = set(d or {}) - known
        if unknown:
            raise ValueError(f"unknown parallel setting(s) {sorted(unknown)}: expected {sorted(known)}")
        return cls(**(d or {}))

    def validate(self, world_size: int, model: ModelConfig) -> None:
        """Raise ValueError naming the setting that cannot run on `world_size` processes with `model`."""
        if not isinstance(self.ep, int) or self.ep < 1 or world_size % self.ep:
            raise ValueError(f"parallel.ep={self.ep!r} is invalid: expected a positive divisor of the number of "
                             f"processes ({world_size})")
        if self.ep > 1 and model.n_routed_experts % self.ep:
            raise ValueError(f"parallel.ep={self.ep} does not divide n_routed_experts={model.n_routed_experts}")
        if self.node_limit:
            check_node_limited_routing(model, self.ep, self.node_limit)


def check_node_limited_routing(model: ModelConfig, ep: int, limit: int) -> None:
    """DeepSeek-V3's node-limited routing is group-limited routing whose groups never straddle two EP ranks: with
    n_group a multiple of ep, each rank holds whole groups, so a token that picks topk_group groups touches at most
    topk_group ranks. Raise ValueError unless the config guarantees at most `limit` ranks per token."""
    if limit < 1:
        raise ValueError(f"parallel.node_limit={limit} is invalid: expected a positive number of EP ranks")
    if model.topk_method == "greedy" or model.n_group <= 1:
        raise ValueError(f"parallel.node_limit={limit} needs group-limited routing (n_group > 1 and topk_method "
                         f"noaux_tc or group_limited_greedy), got n_group={model.n_group}, "
                         f"topk_method={model.topk_method!r}")
    if model.n_group % ep:
        raise ValueError(f"parallel.node_limit needs each EP rank to hold whole expert groups: n_group="
                         f"{model.n_group} must be a multiple of parallel.ep={ep}")
    if model.topk_group > limit:
        raise ValueError(f"parallel.node_limit={limit}: topk_group={model.topk_group} groups may lie on "
                         f"{model.topk_group} EP ranks; set topk_group <= {limit}")


@dataclass
class Processes:
    """This process's place in the run: rank, world size, device, and the mesh (None in a single process)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    mesh: DeviceMesh | None = None  # [dp_mod_ep, ep]

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of `tensor` over every rank (a new tensor; the input is left alone)."""
        if not self.distributed:
            return tensor
        out = tensor.detach().clone()
        dist.all_reduce(out)
        return out

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def launched_by_torchrun() -> bool:
    """Whether torchrun (or another launcher setting its variables) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_processes(config: ParallelConfig, model: ModelConfig) -> Processes:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on CPU) and build the mesh; a plain
    single-process `Processes` when not launched by torchrun."""
    cuda = torch.cuda.is_available()
    if not launched_by_torchrun():
        if config.ep > 1:
            raise ValueError(f"parallel.ep={config.ep} needs several processes: launch with "
                             f"`torchrun --nproc-per-node N -m seekmoe train ...`")
        return Processes(device=torch.device("cuda" if cuda else "cpu"))
    world_size, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    config.validate(world_size, model)
    if cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
        atexit.register(_leave_process_group)  # we joined it, so we leave it: see _leave_process_group
    key = (dist.group.WORLD, device.type, world_size // config.ep, config.ep)  # a new process group: new meshes
    if key not in _MESHES:
        _MESHES[key] = init_device_mesh(device.type, key[2:], mesh_dim_names=("dp_mod_ep", "ep"))
    return Processes(rank, world_size, device, _MESHES[key])


# One mesh per shape for the life of the process group: a second run in the same process group (a script that pretrains
# then fine-tunes, tests/test_matrix.py) reuses it. A fresh mesh of a shape built after a mesh of another shape
# failed FSDP2's check that the experts' DTensor mesh is the one passed to fully_shard (torch 2.11: the flattened
# "dp" sub-mesh is process-global state keyed by dimension names).
_MESHES: dict[tuple, DeviceMesh] = {}


def _leave_process_group() -> None:
    """Destroy the meshes and the process group before the interpreter exits. Left alive, the backend's threads
    are still running when C++ destroys them at exit, which aborts a run that had succeeded ("terminate called
    without an active exception", exit status -6 under torchrun)."""
    _MESHES.clear()
    if dist.is_initialized():
        dist.destroy_process_group()
