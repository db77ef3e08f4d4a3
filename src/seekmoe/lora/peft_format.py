"""Adapters in PEFT's format, which peft maps onto transformers' DeepseekV3ForCausalLM (and DeepseekV2ForCausalLM):
`adapter_config.json` + `adapter_model.safetensors`.

How each adapted weight is written (transformers v5 keeps the routed experts fused, as we do):
- attention projections: `target_modules`, their leaf names (MLA's q_proj or q_a_proj/q_b_proj, kv_a_proj_with_mqa,
  kv_b_proj, o_proj; multi-head attention's q_proj, k_proj, v_proj, o_proj),
  keys `base_model.model.<module>.lora_A.weight` [r, in] and `lora_B.weight` [out, r];
- shared experts and dense MLPs: `target_parameters` (`mlp.shared_experts.gate_proj.weight`, ...), the same keys.
  Not target_modules: peft renames the leaf names gate_proj/up_proj/down_proj of a fused-MoE model to the fused
  expert tensors (its transformers-v4-to-v5 conversion), so naming them there would adapt the experts instead;
- routed experts: `target_parameters` `mlp.experts.gate_up_proj` and `mlp.experts.down_proj`. peft nests its two
  wrappers with gate_up_proj inside, so its factors sit under `mlp.experts.base_layer.` and down_proj's under
  `mlp.experts.`; lora_A.weight is [E * r, in] (expert e's rows e*r .. e*r + r - 1) and lora_B.weight is
  [out, r * E] (expert e's column k at k * E + e);
- routers: `modules_to_save` ["gate"], the full weight and selection bias of every MoE layer's router: the bias moves
  during training (apply.py says why), so the adapter alone reproduces the fine-tuned model.

The MTP modules' adapters (and routers) have no place in transformers' model, which has no MTP: they are written
beside PEFT's file, under seekmoe's own names, to `seekmoe_mtp.safetensors` (peft ignores it), which `read_adapter`
returns with the rest, so `seekmoe merge` gives the run's final/ whole.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .apply import MTP_PREFIX, PROVIDER
from .config import LoRAConfig

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
MTP_WEIGHTS_NAME = "seekmoe_mtp.safetensors"  # the MTP modules' tensors, seekmoe's names (not PEFT's)
PEFT_PREFIX = "base_model.model."
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
_EXPERTS = f".providers.{PROVIDER}."


def to_peft(state: dict[str, torch.Tensor], n_experts: int) -> dict[str, torch.Tensor]:
    """seekmoe's adapter tensors (`apply.lora_parameters`, full, unsharded) under PEFT's keys and layouts."""
    out = {}
    for name, t in state.items():
        t = t.detach().cpu().contiguous()
        if _EXPERTS in name:
            experts, factor = name.split(_EXPERTS)
            where = f"{PEFT_PREFIX}{experts}." + ("base_layer." if factor.startswith("gate_up") else "")
            E, a, b = t.shape
            if factor.endswith("_A"):  # [E, r, in] -> [E * r, in]
                out[where + "lora_A.weight"] = t.reshape(E * a, b)
            else:  # [E, out, r] -> [out, r * E], column k * E + e
                out[where + "lora_B.weight"] = t.permute(1, 2, 0).reshape(a, b * E).contiguous()
        elif name.endswith((".lora_A", ".lora_B")):
            out[f"{PEFT_PREFIX}{name}.weight"] = t
        else:  # a router's weight or selection bias (modules_to_save)
            out[PEFT_PREFIX + name] = t
    return out


def from_peft(tensors: dict[str, torch.Tensor], n_experts: int) -> dict[str, torch.Tensor]:
    """The inverse of `to_peft`: PEFT's keys and layouts back to seekmoe's state-dict names."""
    out = {}
    for key, t in tensors.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        if ".mlp.experts." in name:
            experts, rest = name.split(".mlp.experts.", 1)
            inner = rest.startswith("base_layer.")
            factor = ("gate_up" if inner else "down") + ("_A" if "lora_A" in rest else "_B")
            target = f"{experts}.mlp.experts{_EXPERTS}{factor}"
            if factor.endswith("_A"):
                out[target] = t.reshape(n_experts, -1, t.shape[-1])
            else:
                out[target] = t.reshape(t.shape[0], -1, n_experts).permute(2, 0, 1).contiguous()
        elif name.endswith((".lora_A.weight", ".lora_B.weight")):
            out[name[: -len(".weight")]] = t
        else:
            out[name] = t
    return out


def adapter_config(config: LoRAConfig, model_config, base: str | None, attention: list[str]) -> dict:
    """PEFT's adapter_config.json for an adapter of `config` on a model of `model_config` whose adapted attention
    projections have the leaf names `attention` (MLA's or multi-head attention's)."""
    targets = set(config.target_set)
    modules = sorted(attention)
    parameters = []
    if "experts" in targets and model_config.n_moe_layers:
        parameters += ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    if "shared-experts" in targets and model_config.n_moe_layers and model_config.n_shared_experts:
        parameters += [f"mlp.shared_experts.{n}.weight" for n in MLP_LINEARS]
    if "dense-mlp" in targets and model_config.num_hidden_layers > model_config.n_moe_layers:
        parameters += [f"mlp.{n}.weight" for n in MLP_LINEARS]
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "r": config.rank, "lora_alpha": config.lora_alpha, "lora_dropout": config.dropout,
        "target_modules": modules, "target_parameters": parameters,
        "modules_to_save": ["gate"] if model_config.n_moe_layers else None,
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
        "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True,
    }


def attention_leaves(state: dict) -> list[str]:
    """The leaf names of the adapted attention projections among adapter tensors `state` (q_a_proj, ...)."""
    return sorted({name.split(".self_attn.", 1)[1].split(".")[0] for name in state
                   if ".self_attn." in name and name.endswith(".lora_A")})


def save_adapter(folder: str | Path, state: dict[str, torch.Tensor], config: LoRAConfig, model_config,
                 base: str | None = None) -> Path:
    """Write `folder`/adapter_config.json and adapter_model.safetensors from the adapter tensors `state`
    (`apply.lora_parameters` of the full model), atomically (a temporary sibling renamed into place)."""
    from ..checkpoint import swap_folder

    folder = Path(folder)
    tmp = folder.parent / f".{folder.name}.saving-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    mtp = {k: v.detach().cpu().contiguous() for k, v in state.items() if k.startswith(MTP_PREFIX)}
    state = {k: v for k, v in state.items() if not k.startswith(MTP_PREFIX)}
    save_file(to_peft(state, model_config.n_routed_experts), str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
    if mtp:
        save_file(mtp, str(tmp / MTP_WEIGHTS_NAME), metadata={"format": "pt"})
    text = json.dumps(adapter_config(config, model_config, None if base is None else str(base),
                                     attention_leaves(state)), indent=2)
    (tmp / CONFIG_NAME).write_text(text + "\n")
    swap_folder(tmp, folder)
    return folder


def read_adapter(folder: str | Path, n_experts: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json's dict, the tensors under seekmoe's names, the MTP modules' among them where the folder
    has them) of an adapter folder; ValueError for an adapter this reader cannot apply (not LoRA, per-module ranks,
    DoRA, ...)."""
    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(f"--adapter {folder}: expected {CONFIG_NAME} and {WEIGHTS_NAME} in it (a PEFT "
                                f"adapter folder, e.g. a run's adapter/)")
    try:
        peft = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--adapter {config_path}: not valid JSON ({e})") from None
    if peft.get("peft_type") != "LORA":
        raise ValueError(f"--adapter {folder}: peft_type {peft.get('peft_type')!r}, expected 'LORA'")
    for key in ("rank_pattern", "alpha_pattern"):
        if peft.get(key):
            raise ValueError(f"--adapter {folder}: {key} {peft[key]} is not supported (one rank and alpha for "
                             f"every adapted weight, as seekmoe writes them)")
    for key in ("use_dora", "use_rslora", "fan_in_fan_out"):
        if peft.get(key):
            raise ValueError(f"--adapter {folder}: {key}=true is not supported")
    tensors = from_peft(load_file(str(weights_path)), n_experts)
    if (folder / MTP_WEIGHTS_NAME).is_file():
        tensors.update(load_file(str(folder / MTP_WEIGHTS_NAME)))
    return peft, tensors
