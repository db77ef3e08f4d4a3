"""Kimi-K2.5 folders (model_type `kimi_k25`): config.json with `text_config` and `vision_config`, safetensors keyed as
Moonshot released them and as transformers writes them back.

On disk the language model lies under `language_model.` (`language_model.model.layers.{i}...`,
`language_model.lm_head.weight`; transformers' own saves spell the layers `blocks`), the tower under
`vision_tower.` (`vision_tower.patch_embed.*`, `vision_tower.encoder.blocks.{i}.wqkv`, ...; transformers writes
`vision_tower.encoder.patch_embed.*`), the projector under `mm_projector.` (transformers writes its LayerNorm as
`model.mm_projector.pre_norm.*`). All spellings load; we write Moonshot's, which transformers reads too.

Who calls it: checkpoint.from_pretrained dispatches here on model_type; VisionLanguageModel.save_pretrained.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from ..checkpoint import (_Loader, _checkpoint_dtype, _without_absent_mtp, checkpoint_files, hf_state_items,
                          save_pretrained)
from ..model_folder import check_fits_memory, config_from_dict
from .config import VisionLanguageConfig, text_config_dict
from .model import VisionLanguageModel

LANGUAGE_PREFIX = "language_model."
# transformers' spellings of the tower and projector keys -> Moonshot's (ours).
_VISION_SPELLINGS = ((re.compile(r"^model\.mm_projector\."), "mm_projector."),
                     (re.compile(r"^vision_tower\.encoder\.patch_embed\."), "vision_tower.patch_embed."))


def _language_key(disk_key: str) -> str:
    """`language_model.model.blocks.3.x` -> `model.layers.3.x` (the CausalLM's own key)."""
    key = disk_key[len(LANGUAGE_PREFIX):]
    return re.sub(r"^model\.blocks\.", "model.layers.", key)


def _vision_key(disk_key: str) -> str:
    for pattern, replacement in _VISION_SPELLINGS:
        disk_key = pattern.sub(replacement, disk_key)
    return disk_key


def read_vision_language_config(raw: dict, source: str) -> VisionLanguageConfig:
    """The VisionLanguageConfig of a `kimi_k25` config.json dict, the language model's part held to BOUNDS."""
    text = config_from_dict(text_config_dict(raw, source), f"{source} (text_config)")
    return VisionLanguageConfig.from_dict(raw, text)


def load_vision_language(path: Path, raw: dict, dtype: torch.dtype | None = None,
                         device: str | torch.device | None = None) -> VisionLanguageModel:
    """A Kimi-K2.5 folder as a VisionLanguageModel. Shapes and completeness are checked on the meta device first,
    as for a text model; then each tensor is copied into place once, in `dtype` (default: the checkpoint's).
    A DeepSeek-OCR-2 folder (model_type `deepseek_ocr2`) loads as an Ocr2Model (vision/ocr2_checkpoint.py)."""
    if raw.get("model_type") == "deepseek_ocr2":
        from .ocr2_checkpoint import load_ocr2

        return load_ocr2(path, raw, dtype=dtype, device=device)
    config = read_vision_language_config(raw, str(path / "config.json"))
    device = torch.device(device or "cpu")
    if device.type == "meta":
        with torch.device("meta"):
            model = VisionLanguageModel(config)
        return model if dtype is None else model.to(dtype)

    files = checkpoint_files(path)
    lm_files, lm_disk, vision_files = {}, {}, {}
    for disk_key, name in files.items():
        if disk_key.startswith(LANGUAGE_PREFIX):
            key = _language_key(disk_key)
            lm_files[key], lm_disk[key] = name, disk_key
        else:
            vision_files[disk_key] = name
    config.text_config = _without_absent_mtp(config.text_config, lm_files, path)
    if dtype is None:
        dtype = _checkpoint_dtype(path, files)
    check_fits_memory(config.text_config, dtype.itemsize, f"{str(dtype).removeprefix('torch.')} weights", device,
                      source=str(path))
    with torch.device("meta"):
        model = VisionLanguageModel(config)
    _check_vision_memory(model, dtype, device, path)
    block = tuple((raw.get("quantization_config") or {}).get("weight_block_size", (128, 128)))
    _LanguageLoader(model.language_model, path, lm_files, block, lm_disk).check()
    targets = _vision_targets(model, path, vision_files)
    model = model.to(dtype).to_empty(device=device)
    model.language_model.model.rotary_emb.reset_parameters()  # non-persistent buffers: to_empty left them empty
    model.vision_tower.rope.reset_parameters()
    _LanguageLoader(model.language_model, path, lm_files, block, lm_disk).load()
    copy_vision_tensors(model, path, targets, dtype)
    if config.text_config.tie_word_embeddings:
        model.language_model.lm_head.weight = model.language_model.model.embed_tokens.weight
    model.eval()
    return model


class _Renamed:
    """A safetensors handle read under other names: our key -> the key in the file."""

    def __init__(self, handle, disk_keys: dict[str, str]):
        self.handle, self.disk_keys = handle, disk_keys

    def get_tensor(self, key: str) -> torch.Tensor:
        return self.handle.get_tensor(self.disk_keys.get(key, key))

    def get_slice(self, key: str):
        return self.handle.get_slice(self.disk_keys.get(key, key))

    def keys(self):
        return list(self.disk_keys)


class _LanguageLoader(_Loader):
    """checkpoint.py's loader for the language model of a vision-language folder: its tensors are named
    `language_model.*` on disk (`disk_keys`: the CausalLM's key -> the disk key)."""

    def __init__(self, model, path: Path, files: dict[str, str], block: tuple[int, int], disk_keys: dict[str, str]):
        super().__init__(model, path, files, block)
        self.disk_keys = disk_keys

    def _open(self, name: str):
        if name not in self.handles:
            self.handles[name] = _Renamed(safe_open(str(self.path / name), "pt"), self.disk_keys)
        return self.handles[name]


def _check_vision_memory(model, dtype: torch.dtype, device: torch.device, path: Path) -> None:
    """Refuse, with the arithmetic, a tower and projector (counted on the meta device) that, with the language
    model, cannot fit `device` (check_fits_memory has counted the language model alone)."""
    from ..model_folder import available_memory

    vision = sum(p.numel() for name, p in model.named_parameters() if not name.startswith(LANGUAGE_PREFIX))
    text = sum(p.numel() for p in model.language_model.parameters())
    need = (vision + text) * dtype.itemsize
    have, origin = available_memory(device)
    if need > have:
        raise ValueError(f"{path} does not fit in memory: {vision:,} vision and {text:,} language parameters x "
                         f"{dtype.itemsize} bytes = {need:,} bytes, but {device.type} has {have:,} available "
                         f"({origin})")


def _vision_targets(model, path: Path, vision_files: dict[str, str], rename=_vision_key,
                    expected: str = "language_model.*, vision_tower.* or mm_projector.*", disk_name=str) -> dict:
    """disk key -> (our parameter name, file) for the tower and projector (every parameter outside the language
    model; `rename`: disk key -> our name, `disk_name` the inverse, for messages), every shape checked against the
    (meta) model and every parameter found. ValueError naming the first key that does not fit."""
    params = {n: p for n, p in model.named_parameters() if not n.startswith(LANGUAGE_PREFIX)}
    targets, handles = {}, {}
    for disk_key, file in vision_files.items():
        name = rename(disk_key)
        if name not in params:
            raise ValueError(f"checkpoint tensor {disk_key} in {path} has no place in this vision-language model "
                             f"(expected {expected})")
        if file not in handles:
            handles[file] = safe_open(str(path / file), "pt")
        shape = tuple(handles[file].get_slice(disk_key).get_shape())
        if shape != tuple(params[name].shape):
            raise ValueError(f"checkpoint tensor {disk_key} has shape {shape}, the model expects "
                             f"{tuple(params[name].shape)} (does config.json's vision_config match the weights?)")
        targets[disk_key] = (name, file)
    missing = sorted(set(params) - {name for name, _ in targets.values()})
    if missing:
        shown = ", ".join(map(disk_name, missing[:8])) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ValueError(f"checkpoint in {path} lacks tensors the vision config requires: {shown}")
    return targets


def copy_vision_tensors(model, path: Path, targets: dict, dtype: torch.dtype) -> None:
    """Copy each of `_vision_targets`'s tensors from its file into the (materialized) model's parameter."""
    params = dict(model.named_parameters())
    handles = {}
    with torch.no_grad():
        for disk_key, (name, file) in targets.items():
            if file not in handles:
                handles[file] = safe_open(str(path / file), "pt")
            params[name].copy_(handles[file].get_tensor(disk_key).to(dtype))


def vision_language_state_items(model: VisionLanguageModel) -> Iterator[tuple[str, torch.Tensor]]:
    """(disk key, tensor) pairs in Kimi-K2.5's released layout."""
    for key, tensor in hf_state_items(model.language_model):
        yield LANGUAGE_PREFIX + key, tensor
    for prefix, module in (("vision_tower.", model.vision_tower), ("mm_projector.", model.mm_projector)):
        for key, tensor in module.state_dict().items():
            yield prefix + key, tensor


def save_vision_language(model: VisionLanguageModel, path: str | os.PathLike,
                         max_shard_bytes: int | None = None) -> None:
    """Write `model` as a Kimi-K2.5 folder (config.json + safetensors), atomically as checkpoint.save_pretrained."""
    save_pretrained(model, path, max_shard_bytes=max_shard_bytes, state_items=vision_language_state_items)
