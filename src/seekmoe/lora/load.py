"""QLoRA's model, read from a model folder one decoder block at a time: each block is allocated, filled from the
safetensors, adapted and quantized to NF4 before the next is read, so reading never holds more than the quantized
model and one full-precision block (a model whose full-precision weights exceed memory still loads)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .apply import AdaptedModel, apply_lora
from .config import LoRAConfig

_BLOCK = "model.layers."


def load_quantized(folder: str | Path, model_config, config: LoRAConfig, device: torch.device
                   ) -> tuple[nn.Module, AdaptedModel]:
    """(the CausalLM of `model_config` with `folder`'s weights, adapted as `config` says with NF4 base weights on
    `device`, in training mode; what was adapted). ValueError when the folder lacks a tensor or a shape differs."""
    from .. import build_model
    from ..checkpoint import _Loader, checkpoint_files
    from ..model_folder import read_config_json

    folder = Path(folder)
    model = build_model(model_config, device="meta")
    quantization = read_config_json(folder / "config.json").get("quantization_config") or {}
    loader = _Loader(model, folder, checkpoint_files(folder), tuple(quantization.get("weight_block_size", (128, 128))))
    loader.check()  # every shape and required tensor against the headers, before anything is allocated
    by_block: dict[int | None, list] = {}
    for key, name, index in loader._targets():
        block = int(name[len(_BLOCK):].split(".", 1)[0]) if name.startswith(_BLOCK) else None
        by_block.setdefault(block, []).append((key, name, index))

    def fill(module: nn.Module, prefix: str, items: list) -> None:
        # to_empty gives a meta module new tensor objects: the loader's references are renewed from the module.
        loader.params.update({prefix + n: t for n, t in module.named_parameters()})
        loader.params.update({prefix + n: t for n, t in module.named_buffers()})
        with torch.no_grad():
            for key, name, index in items:
                loader._destination(name, index).copy_(loader._get(key))
                loader.filled.add((name, index))

    model.requires_grad_(False)
    rest = [model.model.embed_tokens, model.model.norm, model.lm_head, model.model.mtp, model.model.rotary_emb]
    for module in rest:
        module.to_empty(device=device)
    fill(model, "", by_block.get(None, []))  # the modules outside the blocks (the blocks' entries renewed below)
    model.model.rotary_emb.reset_parameters()  # a non-persistent buffer: in no checkpoint
    if model_config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    linears, experts, routers = {}, {}, []
    for i, block in enumerate(model.model.layers):
        block.to_empty(device=device)
        fill(block, f"{_BLOCK}{i}.", by_block.get(i, []))
        adapted = apply_lora(model, config, layers=[i])
        prefix = f"{_BLOCK}{i}."
        for name in [n for n in loader.params if n.startswith(prefix)]:
            # the loader keeps only the shapes (for its final check): the full-precision tensors are freed here
            loader.params[name] = loader.params[name].detach().to("meta")
        linears.update(adapted.linears)
        experts.update(adapted.experts)
        routers += adapted.routers
        loader.handles.clear()
    adapted = apply_lora(model, config, layers=[], mtp=True)  # the MTP modules, read with the rest above
    linears.update(adapted.linears)
    experts.update(adapted.experts)
    routers += adapted.routers
    loader._raise_if_missing()
    model.train()
    return model, AdaptedModel(linears, experts, routers, adapted.trainable_params, adapted.total_params)
