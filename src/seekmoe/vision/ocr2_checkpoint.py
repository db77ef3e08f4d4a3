"""DeepSeek-OCR-2 folders (model_type `deepseek_ocr2`): config.json with `text_config` and `vision_config`
(`sam_config`, `encoder_config`), safetensors keyed as DeepSeek released them, which is how transformers writes
them back (its conversion mapping renames on load and reverses on save).

On disk the language model is a plain DeepSeek text model (`model.layers.{i}...`, per-expert matrices,
`lm_head.weight`), SAM lies under `model.sam_model.`, the query encoder under `model.qwen2_model.model.model.`
(its queries `model.qwen2_model.query_768|1024`), the projector is `model.projector.layers.*` and the separator
`model.view_seperator` (sic). The image preprocessing is `preprocessor_config.json` (transformers' processor's file),
read when present and written on save (Ocr2Config.save).

Who calls it: vision/checkpoint.py's load_vision_language dispatches here on model_type; Ocr2Model.save_pretrained.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from ..checkpoint import (_Loader, _checkpoint_dtype, _without_absent_mtp, checkpoint_files, hf_state_items,
                          save_pretrained)
from ..model_folder import check_fits_memory, config_from_dict
from .checkpoint import _check_vision_memory, _vision_targets, copy_vision_tensors
from .ocr2_config import Ocr2Config, ocr2_text_config_dict
from .ocr2_model import Ocr2Model
from .ocr2_preprocess import PREPROCESSOR_FILE, read_processor

log = logging.getLogger(__name__)


class DefaultPreprocessingWarning(UserWarning):
    """A DeepSeek-OCR-2 folder without preprocessor_config.json: images are prepared with the default settings."""

# (our parameter-name prefix, the disk prefix), the first match wins
_PREFIXES = (("vision_tower.sam_model.", "model.sam_model."),
             ("vision_tower.encoder.query_", "model.qwen2_model.query_"),
             ("vision_tower.encoder.", "model.qwen2_model.model.model."),
             ("projector.", "model.projector.layers."),
             ("view_separator", "model.view_seperator"))
_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def vision_disk_key(name: str) -> str:
    """Our tower/projector/separator parameter name -> its key in DeepSeek's layout."""
    for ours, disk in _PREFIXES:
        if name.startswith(ours):
            return disk + name[len(ours):]
    raise KeyError(name)


def _our_vision_name(disk_key: str) -> str | None:
    for ours, disk in _PREFIXES:
        if disk_key.startswith(disk):
            return ours + disk_key[len(disk):]
    return None


def read_ocr2_config(raw: dict, source: str) -> Ocr2Config:
    """The Ocr2Config of a `deepseek_ocr2` config.json dict, the language model's part held to BOUNDS."""
    text = config_from_dict(ocr2_text_config_dict(raw, source), f"{source} (text_config)")
    return Ocr2Config.from_dict(raw, text)


def load_ocr2(path: Path, raw: dict, dtype: torch.dtype | None = None,
              device: str | torch.device | None = None) -> Ocr2Model:
    """A DeepSeek-OCR-2 folder as an Ocr2Model: shapes and completeness checked on the meta device first, then each
    tensor copied into place once, in `dtype` (default: the checkpoint's); its preprocessor_config.json (else the
    default preprocessing, with a DefaultPreprocessingWarning) as `config.processor`."""
    config = read_ocr2_config(raw, str(path / "config.json"))
    config.processor, where = read_processor(path, config)
    if (path / PREPROCESSOR_FILE).is_file():
        log.info(where)
    else:  # preprocessing the folder does not state changes what the model sees: said where a user reads it
        warnings.warn(where, DefaultPreprocessingWarning, stacklevel=3)
    device = torch.device(device or "cpu")
    if device.type == "meta":
        with torch.device("meta"):
            model = Ocr2Model(config)
        return model if dtype is None else model.to(dtype)

    files = checkpoint_files(path)
    lm_files, vision_files = {}, {}
    for disk_key, name in files.items():
        (vision_files if _our_vision_name(disk_key) is not None else lm_files)[disk_key] = name
    config.text_config = _without_absent_mtp(config.text_config, lm_files, path)
    if dtype is None:
        dtype = _checkpoint_dtype(path, files)
    check_fits_memory(config.text_config, dtype.itemsize, f"{str(dtype).removeprefix('torch.')} weights", device,
                      source=str(path))
    with torch.device("meta"):
        model = Ocr2Model(config)
    _check_vision_memory(model, dtype, device, path)
    block = tuple((raw.get("quantization_config") or {}).get("weight_block_size", (128, 128)))
    _Loader(model.language_model, path, lm_files, block).check()
    targets = _vision_targets(model, path, vision_files, rename=_our_vision_name, disk_name=vision_disk_key,
                              expected="model.sam_model.*, model.qwen2_model.*, model.projector.* or "
                                       "model.view_seperator, as config.json's vision_config shapes them")
    model = model.to(dtype).to_empty(device=device)
    model.language_model.model.rotary_emb.reset_parameters()  # non-persistent buffers: to_empty left them empty
    _Loader(model.language_model, path, lm_files, block).load()
    copy_vision_tensors(model, path, targets, dtype)
    if config.text_config.tie_word_embeddings:
        model.language_model.lm_head.weight = model.language_model.model.embed_tokens.weight
    model.eval()
    return model


def ocr2_state_items(model: Ocr2Model) -> Iterator[tuple[str, torch.Tensor]]:
    """(disk key, tensor) pairs in DeepSeek-OCR-2's released layout: the language model's experts one matrix each
    (transformers' conversion merges them on load; it reads no stacked form for this model)."""
    I = model.config.text_config.moe_intermediate_size
    for key, tensor in hf_state_items(model.language_model):
        m = _EXPERT.match(key)
        if m is None:
            yield key, tensor
        elif m.group(2) == "gate_up_proj":
            for e in range(tensor.shape[0]):
                yield f"{m.group(1)}.{e}.gate_proj.weight", tensor[e, :I]
                yield f"{m.group(1)}.{e}.up_proj.weight", tensor[e, I:]
        else:
            for e in range(tensor.shape[0]):
                yield f"{m.group(1)}.{e}.down_proj.weight", tensor[e]
    for name, tensor in model.state_dict().items():
        if not name.startswith("language_model."):
            yield vision_disk_key(name), tensor


def save_ocr2(model: Ocr2Model, path: str | os.PathLike, max_shard_bytes: int | None = None) -> None:
    """Write `model` as a DeepSeek-OCR-2 folder (config.json + safetensors), atomically as
    checkpoint.save_pretrained."""
    save_pretrained(model, path, max_shard_bytes=max_shard_bytes, state_items=ocr2_state_items)
