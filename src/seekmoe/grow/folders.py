"""What `seekmoe expand` and `seekmoe upcycle` share: read the source model folder, write the grown one next to it."""

from __future__ import annotations

import shutil
from pathlib import Path

MODEL_FILES = {"config.json", "model.safetensors", "model.safetensors.index.json"}


def load_source(model_dir: str, out_dir: str, verb: str):
    """(source folder, out folder, the source model in fp32); raises ValueError when --out is the --model folder."""
    import torch

    from ..checkpoint import from_pretrained

    source, out = Path(model_dir), Path(out_dir)
    if out.resolve() == source.resolve():
        raise ValueError(f"--out {out} is the --model folder: write the {verb} model to a new folder")
    return source, out, from_pretrained(source, dtype=torch.float32)


def save_grown(model, source: Path, out: Path) -> None:
    """Save the grown model to `out` with the source folder's other files (tokenizer, generation settings)."""
    model.save_pretrained(out)
    for entry in source.iterdir():
        if entry.is_file() and entry.name not in MODEL_FILES and not entry.name.endswith(".safetensors"):
            shutil.copy2(entry, out / entry.name)


def parameter_change(before_config, after_config) -> str:
    """The total and activated parameter counts before -> after, in millions."""
    from ..info import model_summary

    before, after = model_summary(before_config), model_summary(after_config)
    return (f"parameters: total {before['total_params'] / 1e6:.3f}M -> {after['total_params'] / 1e6:.3f}M, "
            f"activated {before['active_params'] / 1e6:.3f}M -> {after['active_params'] / 1e6:.3f}M")
