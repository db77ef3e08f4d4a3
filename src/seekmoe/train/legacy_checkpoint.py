"""The read path for training checkpoints in the single-process format seekmoe wrote before every checkpoint became
DCP (sharded_checkpoint.py): a Hugging Face model folder plus `optimizer.safetensors` (AdamW's state keyed
`{parameter name}.{exp_avg|exp_avg_sq|step}`) and `optimizer.json` (its parameter groups, by name). They resume at
any number of processes: each process reads the full tensors and keeps its own shards. Nothing writes this format
any more; tests/data/legacy_checkpoint holds one to test this path on.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file


def is_legacy(directory: Path) -> bool:
    """Whether a checkpoint folder is in the old single-process format."""
    return not (Path(directory) / "dcp").is_dir() and (Path(directory) / "optimizer.safetensors").is_file()


def load_legacy_state(directory: Path, model, optimizer: torch.optim.Optimizer) -> None:
    """Every process calls this: restore model weights, router biases and the optimizer from an old-format
    checkpoint into a model that may be sharded over several processes."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    from ..checkpoint import from_pretrained

    directory = Path(directory)
    full = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, from_pretrained(directory, dtype=torch.float32).state_dict(), options=full)
    groups = json.loads((directory / "optimizer.json").read_text())["param_groups"]
    live = {id(p): n for n, p in model.named_parameters()}
    if [g["params"] for g in groups] != [[live[id(p)] for p in g["params"]] for g in optimizer.param_groups]:
        raise ValueError(f"{directory}'s optimizer covers other parameters than this run trains: resume with the same "
                         f"model configuration and --train selection")
    state: dict[str, dict] = {}
    for key, value in load_file(str(directory / "optimizer.safetensors")).items():
        name, _, field = key.rpartition(".")
        state.setdefault(name, {})[field] = value
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups}, options=full)
