"""Applying an adapter: `attach_adapter` puts a PEFT adapter folder's factors (and routers) onto a seekmoe model,
`merge_adapter` writes base + adapter as one plain model folder (`seekmoe merge`). The base folder is only read."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

from .apply import MTP_PREFIX, AdaptedModel, apply_lora, lora_parameters
from .config import LoRAConfig
from .peft_format import read_adapter

_MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json")


def config_of_adapter(peft: dict) -> LoRAConfig:
    """The LoRAConfig that builds the modules a PEFT adapter_config.json describes."""
    targets = []
    if peft.get("target_modules"):
        targets.append("attention")
    params = peft.get("target_parameters") or []
    if any(p.startswith("mlp.experts.") for p in params):
        targets.append("experts")
    if any(p.startswith("mlp.shared_experts.") for p in params):
        targets.append("shared-experts")
    if any(p.split(".")[:2] in (["mlp", "gate_proj"], ["mlp", "up_proj"], ["mlp", "down_proj"]) for p in params):
        targets.append("dense-mlp")
    if not targets:
        raise ValueError(f"adapter targets {peft.get('target_modules')} / {params}: none that seekmoe adapts")
    rank = peft.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"adapter r={rank!r}: expected a rank >= 1")
    return LoRAConfig(rank=rank, alpha=float(peft.get("lora_alpha", rank)), targets=",".join(targets))


@torch.no_grad()
def attach_adapter(model: nn.Module, folder: str | Path) -> AdaptedModel:
    """Adapt `model` (a plain CausalLM) as the PEFT adapter in `folder` says and load its tensors (factors, routers'
    weights and selection biases; the MTP modules' where the folder has them: a PEFT adapter from elsewhere leaves
    them as they are); ValueError when a tensor has no place or a shape differs."""
    peft, tensors = read_adapter(folder, model.config.n_routed_experts)
    adapted = apply_lora(model, config_of_adapter(peft), mtp=any(k.startswith(MTP_PREFIX) for k in tensors))
    own = lora_parameters(model)
    state = model.state_dict(keep_vars=True)
    for name, tensor in tensors.items():
        if name not in own:
            raise ValueError(f"adapter {folder}: tensor {name} has no place in this model (is it the adapter of "
                             f"another model?)")
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise ValueError(f"adapter {folder}: {name} has shape {tuple(tensor.shape)}, the model expects "
                             f"{tuple(own[name].shape)}")
        state[name].copy_(tensor.to(state[name].dtype))
    missing = [n for n in own if n not in tensors and not n.split(".")[-1].startswith(("weight", "e_score"))]
    if missing:
        raise ValueError(f"adapter {folder}: no tensor for {missing[0]} ({len(missing)} missing)")
    return adapted


def merge_adapter(base: str | Path, adapter: str | Path, out: str | Path) -> Path:
    """Write the model folder `out`: the base folder's weights with the adapter merged in (W + alpha/r * B @ A, the
    routers of the adapter), in the base's dtype, and the base's other files (tokenizer, ...) copied. Refuses an
    `out` that is, or lies inside, the base folder, or that already holds files."""
    from .. import from_pretrained

    base, adapter, out = Path(base), Path(adapter), Path(out)
    if not (base / "config.json").is_file():
        raise FileNotFoundError(f"--model {base}: no config.json (expected a model folder)")
    resolved_base, resolved_out = base.resolve(), out.resolve()
    if resolved_out == resolved_base or resolved_base in resolved_out.parents:
        raise ValueError(f"--out {out} is inside the base folder {base}, which merging never writes: choose "
                         f"another folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} already exists and is not empty: choose a new folder")
    model = from_pretrained(base)
    attach_adapter(model, adapter)  # reads and checks the whole adapter before anything is written
    model.save_pretrained(out)
    for entry in base.iterdir():
        if entry.name in _MODEL_FILES or entry.name.startswith("model-") or entry.name.startswith("."):
            continue
        if entry.is_file():
            shutil.copy2(entry, out / entry.name)
    return out
