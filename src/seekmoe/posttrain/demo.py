"""`make demo-post`: a tiny model learns a task's format by SFT, then improves on it by GRPO, on CPU in minutes.

`make_base_model` also gives the tests their starting point: a randomly initialized tiny model with a tokenizer
trained on the task's own text (no download, no pretraining run).
"""

from __future__ import annotations

from pathlib import Path

import torch


def make_base_model(folder: str | Path, texts: list[str], preset: str = "tiny", seed: int = 0, **fields) -> Path:
    """Write a model folder (config, weights, tokenizer files) of a freshly initialized `preset` model whose
    byte-level BPE tokenizer is trained on `texts`; ModelConfig `fields` override the preset's."""
    from .. import build_model
    from ..config import ModelConfig
    from ..data import train_tokenizer
    from ..inference.tokenizer import write_tokenizer_files

    folder = Path(folder)
    config = ModelConfig.preset(preset, **fields)
    tokenizer = train_tokenizer(texts, config.vocab_size)
    torch.manual_seed(seed)
    build_model(config).save_pretrained(folder)
    write_tokenizer_files(tokenizer, folder, config.max_position_embeddings)
    return folder
