"""`seekmoe export`: turn a training checkpoint (DCP, written at any number of processes, or the older
single-process format) into a Hugging Face model folder with its tokenizer files, loadable by `seekmoe generate`,
`seekmoe serve` and transformers' AutoModelForCausalLM."""

from __future__ import annotations

import json
from pathlib import Path


def is_training_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a training checkpoint folder (`OUT/checkpoints/step-N/`) in the DCP format."""
    return (Path(path) / "dcp").is_dir() and (Path(path) / "trainer_state.json").is_file()


def checkpoint_model(checkpoint: str | Path):
    """The model (fp32, CPU) of a training checkpoint folder, in either format; ValueError naming what is wrong
    when the checkpoint is incomplete or corrupted."""
    import torch

    from .. import build_model
    from ..config import ModelConfig
    from .checkpointing import verify_checkpoint
    from .legacy_checkpoint import is_legacy
    from .sharded_checkpoint import load_dcp_state

    source = Path(checkpoint)
    problem = verify_checkpoint(source)
    if problem is not None:
        raise ValueError(f"{source} is not an intact training checkpoint: {problem}")
    if is_legacy(source):
        from ..checkpoint import from_pretrained

        return from_pretrained(source, dtype=torch.float32)
    model = build_model(ModelConfig.from_dict(json.loads((source / "config.json").read_text())))
    lora = json.loads((source / "trainer_state.json").read_text()).get("train_config", {}).get("lora")
    if lora:  # a LoRA run's checkpoint holds the adapted modules; the folder gets them merged
        from ..lora import LoRAConfig, apply_lora

        apply_lora(model, LoRAConfig.from_dict(lora))
    load_dcp_state(source, model, None)
    return model


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the model of `checkpoint` (a `checkpoints/step-N/` folder, or a run folder: its newest intact
    checkpoint) to the new folder `out`; returns the checkpoint folder it read. Raises ValueError naming what is
    wrong when the checkpoint is incomplete or corrupted, or `out` already holds files."""
    from ..inference.tokenizer import read_tokenizer_file

    from .checkpointing import save_model_folder, scan_checkpoints

    source, out = Path(checkpoint), Path(out)
    if not source.is_dir():
        raise FileNotFoundError(f"--checkpoint {source}: no such folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} already exists and is not empty: choose a new folder (nothing is overwritten)")
    if not (source / "manifest.json").is_file() and (source / "checkpoints").is_dir():
        newest, broken = scan_checkpoints(source)
        if newest is None:
            found = "; ".join(f"{p.name}: {why}" for p, why in broken) or "none"
            raise ValueError(f"--checkpoint {source}: no intact checkpoint in {source / 'checkpoints'} ({found})")
        source = newest
    try:
        model = checkpoint_model(source)
    except ValueError as e:
        raise ValueError(f"--checkpoint {e}") from None
    save_model_folder(out, model, model.config, read_tokenizer_file(source / "tokenizer.json"))
    return source
