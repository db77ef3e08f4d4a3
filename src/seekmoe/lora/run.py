"""What a training run (train, sft, rl: the Trainer) does with LoRA: check the settings before anything is written,
and at the end write OUT/adapter/ (PEFT's format) and, for QLoRA, OUT/final/ merged into the full-precision base (the
Trainer adapts the model before it is parallelized, or reads it with load.py for QLoRA)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .apply import lora_parameters
from .config import LoRAConfig

ADAPTER_DIR = "adapter"


def lora_for_run(section: dict, trainable: str, model_config, init_from, distributed: bool) -> LoRAConfig | None:
    """The run's LoRAConfig from TrainConfig's `lora` section (None when empty), checked against the model: ValueError
    before the run writes anything."""
    if not section:
        return None
    config = LoRAConfig.from_dict(section)
    if init_from is None:
        raise ValueError("--lora adapts a trained model: give it with --init-from DIR (train) or --model DIR")
    if trainable != "all":
        raise ValueError(f"--lora trains adapters, --train {trainable!r} chooses whole tensors: use one of them")
    config.check_widths(model_config)
    if config.quantize == "nf4":
        from .nf4 import require_torchao

        require_torchao()
        if distributed:
            raise ValueError("--quantize nf4 runs in one process (NF4 base weights are not sharded): drop torchrun, "
                             "or train LoRA without --quantize")
    return config


def full_adapter_state(model: nn.Module, distributed: bool, rank: int) -> dict[str, torch.Tensor] | None:
    """Every adapter tensor of `model` in full on the CPU, on rank 0 (None on the others; collective when
    `distributed`)."""
    if not distributed:
        return {k: v.detach().cpu() for k, v in lora_parameters(model).items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    names = set(lora_parameters(model))
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return None
    return {k: v for k, v in state.items() if k in names}


def save_lora_outputs(out: Path, model: nn.Module, config: LoRAConfig, model_config, init_from, rank: int,
                      distributed: bool) -> Path | None:
    """Write OUT/adapter/ (every process calls this; rank 0 writes). Returns the adapter folder on rank 0."""
    from .peft_format import save_adapter

    state = full_adapter_state(model, distributed, rank)
    if state is None:
        return None
    return save_adapter(Path(out) / ADAPTER_DIR, state, config, model_config, base=str(init_from))


def merged_final(out: Path, init_from, write_tokenizer) -> Path:
    """QLoRA's OUT/final/: the full-precision base folder with the adapter merged in (not the NF4 weights the run
    trained on), the run's tokenizer files written into it."""
    import shutil

    from .merge import merge_adapter

    final = Path(out) / "final"
    shutil.rmtree(final, ignore_errors=True)  # a previous attempt's: final/ is rewritten whole at a run's end
    merge_adapter(init_from, Path(out) / ADAPTER_DIR, final)
    write_tokenizer(final)
    return final
