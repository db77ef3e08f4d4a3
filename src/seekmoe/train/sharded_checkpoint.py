"""Model and optimizer state in torch.distributed.checkpoint (DCP) format, for any number of processes.

Every process writes the shards it holds (one process: everything) and reads back the slices it needs, so a
checkpoint written by N processes resumes with any number, one included; DCP needs no process group in one process.
What is saved is one flat dict of tensors only, `model.{name}` for each model state entry and
`optim.{parameter name}.{exp_avg|exp_avg_sq|step}` for AdamW's state, so nothing but DCP's own index
(`.metadata`) is pickled; that index is read with an unpickler that admits only the classes DCP writes there.
Used by checkpointing.py (training checkpoints) and export.py (a checkpoint to a Hugging Face folder). Only APIs
present since torch 2.6 (the floor pyproject admits) are used.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint import FileSystemReader

try:
    from torch.distributed.checkpoint.metadata import StorageMeta
except ImportError:  # older torch
    StorageMeta = None

DCP_DIR = "dcp"
# DCP warns that it assumes one process when no process group is initialized: that is the intent here.
_SINGLE_PROCESS_WARNING = r"torch\.distributed is .*(unavailable|uninitialized)"


def save_dcp_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Every process calls this: write the model's state (and the optimizer's) into the DCP folder `path`."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SINGLE_PROCESS_WARNING)
        dcp.save(_flat_state(model, optimizer), checkpoint_id=str(path))


def load_dcp_state(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Every process calls this: restore the model (and the optimizer) from `directory/dcp`, a checkpoint written at
    any number of processes. Parameters that had no optimizer state when it was saved (they never had a gradient)
    get none."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    directory = Path(directory)
    reader = _SafeReader(str(directory / DCP_DIR))
    saved = reader.read_metadata().state_dict_metadata
    _check_optimizer_groups(directory, model, optimizer)
    if optimizer is None:
        model_state, optim_state = model.state_dict(), None
    else:
        model_state, optim_state = get_state_dict(model, optimizer)
    flat = _flatten(model_state, optim_state)
    for key, tensor in flat.items():
        if key.startswith("model.") and key not in saved:
            raise ValueError(f"{directory} holds no {key[len('model.'):]}: resume with the model configuration it "
                             f"was written with")
        if key in saved and tuple(saved[key].size) != tuple(tensor.shape):
            raise ValueError(f"{directory} holds {key.split('.', 1)[1]} of shape {list(saved[key].size)}, this model "
                             f"has {list(tensor.shape)}: resume with the model configuration it was written with")
    request = {k: v for k, v in flat.items() if k in saved}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SINGLE_PROCESS_WARNING)
        dcp.load(request, storage_reader=reader)  # into the tensors of `request`, in place
    model_state = {k[len("model."):]: v for k, v in request.items() if k.startswith("model.")}
    if optimizer is None:
        model.load_state_dict(model_state)
        return
    state: dict[str, dict] = {}
    for key, value in request.items():
        if key.startswith("optim."):
            name, _, field = key[len("optim."):].rpartition(".")
            state.setdefault(name, {})[field] = value
    # strict=False: a parameter that never had a gradient has no saved state, and keeps none (the model's keys were
    # checked above).
    set_state_dict(model, optimizer, model_state_dict=model_state,
                   optim_state_dict={"state": state, "param_groups": optim_state["param_groups"]},
                   options=StateDictOptions(strict=False))


def optimizer_groups(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's parameter groups as JSON: hyperparameters and parameter names (optimizer.json)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {"param_groups": [{**{k: v for k, v in g.items() if k != "params" and _is_json(v)},
                              "params": [names[id(p)] for p in g["params"]]} for g in optimizer.param_groups]}


def _flat_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    if optimizer is None:
        return _flatten(model.state_dict(), None)
    return _flatten(*get_state_dict(model, optimizer))


def _flatten(model_state: dict, optim_state: dict | None) -> dict[str, torch.Tensor]:
    flat = {f"model.{k}": v for k, v in model_state.items()}
    for name, entry in (optim_state or {}).get("state", {}).items():
        for field, value in entry.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"optimizer state {name}.{field} is a {type(value).__name__}, not a tensor")
            flat[f"optim.{name}.{field}"] = value
    return flat


def _check_optimizer_groups(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    import json

    path = directory / "optimizer.json"
    if optimizer is None or not path.is_file():
        return
    saved = [g["params"] for g in json.loads(path.read_text())["param_groups"]]
    live = [g["params"] for g in optimizer_groups(model, optimizer)["param_groups"]]
    if saved != live:
        raise ValueError(f"{directory}'s optimizer covers other parameters than this run trains: resume with the same "
                         f"model configuration and --train selection")


def _is_json(value) -> bool:
    return isinstance(value, (bool, int, float, str, type(None))) or (
        isinstance(value, (list, tuple)) and all(_is_json(v) for v in value))


# DCP's `.metadata` is a pickle: admit only the classes DCP itself writes there, never arbitrary callables.
_ALLOWED_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                    "torch.distributed.checkpoint._extension")
_ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
            ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib._local", "PosixPath"),
            ("pathlib._local", "PurePosixPath"), ("builtins", "set"), ("builtins", "frozenset")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        value = None
        if module in _ALLOWED_MODULES and not name.startswith("__"):
            value = super().find_class(module, name)
            if not isinstance(value, type):
                value = None
        elif (module, name) in _ALLOWED or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            value = super().find_class(module, name)
        if value is None:
            raise ValueError(f"the checkpoint's DCP index names {module}.{name}, which DCP never writes: refusing "
                             f"to load it (corrupted, or not a seekmoe checkpoint)")
        return value


class _SafeReader(FileSystemReader):
    """FileSystemReader whose index is read by _MetadataUnpickler instead of pickle.load."""

    def read_metadata(self, *args, **kwargs):
        path = Path(str(self.path)) / ".metadata"
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except FileNotFoundError:
            raise FileNotFoundError(f"no {path}: not a complete DCP checkpoint") from None
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError) as e:
            raise ValueError(f"{path} cannot be read ({type(e).__name__}: {e}): corrupted") from None
        if StorageMeta is not None and hasattr(metadata, "storage_meta"):  # what FileSystemReader does since 2.4
            if metadata.storage_meta is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = getattr(self, "load_id", None)
        return metadata
