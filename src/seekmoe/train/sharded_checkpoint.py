"""Training checkpoints of a multi-process run, in torch.distributed.checkpoint (DCP) format.

`OUT/checkpoints/step-NNNNNNNN/` holds `dcp/` (model, router biases and optimizer state, each rank writing its own
shards), `tokenizer.json`, `trainer_state.json`, `rng.safetensors` (rank 0's generators) and `manifest.json`
(every file's size and SHA-256, written last). As with single-process checkpoints (checkpointing.py) the folder is
written under a temporary name and renamed into place by rank 0 once every rank has written, so it exists complete
or not at all. DCP reshards on load: a checkpoint written by N processes resumes with any number, one included.
A single-process checkpoint (Hugging Face layout) resumes under N processes through `load_full_optimizer_state`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .checkpointing import (_maybe_pause, _rng_tensors, checkpoint_dir, prune_checkpoints, swap_into_place,
                            write_manifest)

DCP_DIR = "dcp"


def is_sharded(directory: Path) -> bool:
    """Whether a checkpoint folder is in DCP format (else it is a single-process, Hugging Face layout one)."""
    return (Path(directory) / DCP_DIR).is_dir()


def save_sharded_checkpoint(out: Path, step: int, model, optimizer: torch.optim.Optimizer, tokenizer, state: dict,
                            keep: int, rank: int, barrier: Callable[[], None]) -> Path:
    """Every rank calls this: write the checkpoint of `step` (DCP shards from every rank, the rest from rank 0),
    then keep the newest `keep` complete checkpoints."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = checkpoint_dir(out, step)
    tmp = final.parent / f".tmp-{final.name}"
    if rank == 0:
        for stale in final.parent.glob(".tmp-*") if final.parent.is_dir() else []:
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp / DCP_DIR))
    if rank == 0:
        tokenizer.save(str(tmp / "tokenizer.json"))
        save_file(_rng_tensors(), str(tmp / "rng.safetensors"))
        (tmp / "trainer_state.json").write_text(json.dumps({**state, "step": step}, indent=2) + "\n")
        _maybe_pause(step)
        write_manifest(tmp)
        swap_into_place(tmp, final)
        prune_checkpoints(out, keep, final)
    barrier()
    return final


def load_sharded_checkpoint(directory: Path, model, optimizer: torch.optim.Optimizer) -> dict:
    """Every rank calls this: restore model, router biases and optimizer from a DCP checkpoint written at any world
    size (rank 0's RNG state too); returns trainer_state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(Path(directory) / DCP_DIR))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng = load_file(str(Path(directory) / "rng.safetensors"))
    torch.set_rng_state(rng["cpu"])
    return json.loads((Path(directory) / "trainer_state.json").read_text())


def load_full_optimizer_state(directory: Path, model, optimizer: torch.optim.Optimizer) -> None:
    """Restore the optimizer of a (possibly sharded) model from a single-process checkpoint's full optimizer files
    (`optimizer.safetensors` + `optimizer.json`, keyed by parameter name); each rank keeps its own shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    tensors = load_file(str(Path(directory) / "optimizer.safetensors"))
    groups = json.loads((Path(directory) / "optimizer.json").read_text())["param_groups"]
    state: dict[str, dict] = {}
    for key, value in tensors.items():
        name, _, field = key.rpartition(".")
        state.setdefault(name, {})[field] = value
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups},
                             options=StateDictOptions(full_state_dict=True))
