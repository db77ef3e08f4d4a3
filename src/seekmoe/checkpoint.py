"""Hugging Face-layout checkpoints: config.json + safetensors (single file or sharded), FP8 block dequantization.

Our modules store routed experts stacked (`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj`
[E, H, I]) and MTP modules under `model.mtp.{j}`; on disk they are DeepSeek's per-expert keys
(`mlp.experts.{e}.gate_proj.weight`, ...) and `model.layers.{num_hidden_layers + j}`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from .config import ModelConfig
from .mapped_weights import map_pretrained, write_items
from .model import CausalLM
from .checkpoint_v4 import v4_disk_key, v4_model_key
from .model.experts import fold_weight_providers
from .model.routing import HashTableRouter
from .model_folder import (available_memory, check_config_bounds, check_fits_memory, config_from_dict,
                           read_config_json)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_SHARD_BYTES = 5 * 1024**3
_EXPERT_KEY = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
# On disk, each MTP layer repeats the shared embedding and output head (DeepSeek-V3's release does this).
_MTP_SHARED = {"embed_tokens.weight": "model.embed_tokens.weight", "shared_head.head.weight": "lm_head.weight"}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# model_types whose checkpoints hold each layer's experts stacked (`mlp.experts.gate_up_proj` [E, 2I, H]), as
# transformers writes a model it has no per-expert key conversion for; loading reads either form.
STACKED_EXPERT_MODEL_TYPES = ("deepseek_ocr2_text",)
VISION_MODEL_TYPES = ("kimi_k25", "deepseek_ocr2")  # folders vision/checkpoint.py loads


# ----------------------------------------------------------------------------------------------------- saving
def hf_state_items(model: CausalLM) -> Iterator[tuple[str, torch.Tensor]]:
    """(disk key, tensor) pairs in DeepSeek's layout, one expert matrix at a time (views, no copies)."""
    config = model.config
    state = fold_weight_providers(model, model.state_dict(keep_vars=False))  # partly frozen experts: plain stacks
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    yield from disk_items(state, config)
    L = config.num_hidden_layers
    for j in range(0 if config.is_v4 else len(model.model.mtp)):  # V4's release does not repeat them
        for suffix, shared in _MTP_SHARED.items():
            source = state.get(shared, state["model.embed_tokens.weight"])
            yield f"model.layers.{L + j}.{suffix}", source


def disk_items(state: dict[str, torch.Tensor], config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(disk key, tensor) pairs of any part of our state dict in DeepSeek's layout: each expert stack as per-expert
    matrices in stack order (gate, up of expert 0, then of expert 1, ...; views, no copies)."""
    L, I = config.num_hidden_layers, config.moe_intermediate_size
    # transformers writes DeepSeek-OCR-2's text model with its experts stacked, as we hold them (no conversion)
    per_expert = config.model_type not in STACKED_EXPERT_MODEL_TYPES
    for key, tensor in state.items():
        key = key if config.is_v4 else _to_disk_key(key, L)  # V4's MTP modules: `mtp.{j}.` (checkpoint_v4.py)
        if per_expert and key.endswith(".mlp.experts.gate_up_proj"):
            prefix = key[: -len("gate_up_proj")]
            for e in range(tensor.shape[0]):
                yield f"{prefix}{e}.gate_proj.weight", tensor[e, :I]
                yield f"{prefix}{e}.up_proj.weight", tensor[e, I:]
        elif per_expert and key.endswith(".mlp.experts.down_proj"):
            prefix = key[: -len("down_proj")]
            for e in range(tensor.shape[0]):
                yield f"{prefix}{e}.down_proj.weight", tensor[e]
        else:
            yield key, tensor


def _v4_disk_items(items: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    for key, tensor in items:
        yield v4_disk_key(key), tensor


def _to_disk_key(key: str, n_layers: int) -> str:
    m = re.match(r"^model\.mtp\.(\d+)\.(.*)$", key)
    return f"model.layers.{n_layers + int(m.group(1))}.{m.group(2)}" if m else key


def save_pretrained(model: CausalLM, path: str | os.PathLike, max_shard_bytes: int | None = None,
                    state_items=hf_state_items) -> None:
    """Write `path/config.json` and the weights as safetensors, sharded with an index past `max_shard_bytes`.

    Everything is written into a temporary sibling folder, together with links to the other files already in `path`
    (a tokenizer, say), and swapped in with two renames: a crash mid-save leaves the previous model complete (in
    `path`, or for an instant in `.NAME.old-PID` beside it). Of the old files only the previous model's own
    (config.json, model.safetensors, the index and the shards it names) are replaced.
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.saving-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _write_model_files(model, tmp, max_shard_bytes or DEFAULT_SHARD_BYTES, state_items)
    if not path.exists():
        os.rename(tmp, path)
        return
    replaced = {"config.json", SINGLE_NAME, INDEX_NAME} | set(os.listdir(tmp))
    if (path / INDEX_NAME).is_file():
        try:
            replaced |= set(json.loads((path / INDEX_NAME).read_text())["weight_map"].values())
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            pass
    for entry in path.iterdir():
        if entry.name not in replaced and not entry.name.startswith(".tmp-"):
            if entry.is_dir():
                shutil.copytree(entry, tmp / entry.name, copy_function=os.link)
            else:
                os.link(entry, tmp / entry.name)
    swap_folder(tmp, path)


def swap_folder(tmp: Path, final: Path) -> None:
    """Put the folder `tmp` in place of `final` and delete the old `final`. On Linux the two are exchanged in one
    atomic rename (renameat2 RENAME_EXCHANGE), so `final` is never missing; elsewhere the old one is renamed aside
    first, and a crash between the two renames leaves it complete as `.old-NAME`. Its files get the mode the
    umask gives new files (safetensors >= 0.7 writes its own owner-only): a model folder is readable as a whole."""
    mask = os.umask(0)
    os.umask(mask)
    for entry in tmp.rglob("*"):
        if entry.is_file() and not entry.is_symlink():
            os.chmod(entry, 0o666 & ~mask)
    if final.exists() and _exchange(tmp, final):
        shutil.rmtree(tmp)
        return
    old = final.parent / f".old-{final.name}"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where the system cannot."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        at_fdcwd, rename_exchange = -100, 2
        return libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
    except (OSError, AttributeError):
        return False


def _write_model_files(model: CausalLM, path: Path, limit: int, state_items=hf_state_items) -> None:
    """config.json and the safetensors (one file, or shards and their index) into the empty folder `path`;
    `state_items(model)` gives the (disk key, tensor) pairs (a vision-language model has its own: vision/)."""
    model.config.save(path)
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size, group = 0, None
    items = state_items(model)
    is_v4 = getattr(model.config, "is_v4", False)
    for key, tensor in (_v4_disk_items(items) if is_v4 else items):  # transformers' V4 names
        nbytes = tensor.numel() * tensor.element_size()
        # One layer's expert stack (gate and up rows, or down) stays in one shard, back to back, so that a mapped
        # load (mapped_weights.py) views it in place.
        m = _EXPERT_KEY.match(key)
        previous, group = group, (m.group(1), m.group(3) == "down_proj") if m else None
        if shards[-1] and size + nbytes > limit and (group is None or group != previous):
            shards.append([])
            size = 0
        shards[-1].append((key, tensor))
        size += nbytes
    if len(shards) == 1:
        _write_shard(path / SINGLE_NAME, shards[0])
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _write_shard(path / name, shard)
        for key, tensor in shard:
            weight_map[key] = name
            total += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def _write_shard(file: Path, items: list[tuple[str, torch.Tensor]]) -> None:
    # In the given order (each expert stack back to back), not sorted by name as safetensors' save_file would, and
    # streamed tensor by tensor; the files are ordinary safetensors for every reader.
    write_items(file, items, metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------------- loading
def checkpoint_files(path: Path) -> dict[str, str]:
    """Map every tensor key of the checkpoint in `path` to the safetensors file holding it."""
    if (path / INDEX_NAME).is_file():
        weight_map = _checked_index(path)
        for name in sorted(set(weight_map.values())):
            _check_safetensors(path / name)
        return weight_map
    if (path / SINGLE_NAME).exists():
        _check_safetensors(path / SINGLE_NAME)
        with safe_open(str(path / SINGLE_NAME), "pt") as f:
            return {k: SINGLE_NAME for k in f.keys()}
    raise FileNotFoundError(f"no {SINGLE_NAME} or {INDEX_NAME} in {path}")


def _checked_index(path: Path) -> dict[str, str]:
    """The weight_map of `path`'s safetensors index, checked: a JSON object whose 'weight_map' maps tensor names to
    shard file names inside the folder. ValueError naming the file and the first bad entry otherwise."""
    file = path / INDEX_NAME
    try:
        index = json.loads(file.read_bytes())
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, nesting too deep
        raise ValueError(f"{file} is not valid JSON ({str(e)[:200]}): expected a safetensors index") from None
    found = index.get("weight_map") if isinstance(index, dict) else index
    if not isinstance(found, dict):
        raise ValueError(f"{file} is not a safetensors index: expected a JSON object with a 'weight_map' object "
                         f"(tensor name -> shard file), found {'none' if found is None else type(found).__name__}")
    weight_map = found
    root = path.resolve()
    for key, name in weight_map.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"{file}: weight_map[{key!r}] is {str(name)[:80]!r} ({type(name).__name__}): expected "
                             f"the name of a .safetensors file in {path}")
    for name in set(weight_map.values()):
        target = (path / name).resolve()
        if Path(name).is_absolute() or root not in target.parents:
            raise ValueError(f"{file} names shard {name!r} outside the model folder {path}")
    return weight_map


def _check_safetensors(file: Path) -> None:
    """Raise FileNotFoundError or ValueError, naming `file`, unless it is a readable safetensors file (its header
    parses); safetensors' own errors name neither the file nor what was expected."""
    if not file.exists():
        raise FileNotFoundError(f"{file} does not exist: expected a safetensors file (named in the model folder's "
                                f"{INDEX_NAME})")
    if not file.is_file():
        raise ValueError(f"{file} is a directory, not a file: expected a safetensors file")
    try:
        with safe_open(str(file), "pt"):
            pass
    except Exception as e:  # SafetensorError (not exported by every version), OSError
        why = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(f"{file} is not a valid safetensors file ({why}): expected an 8-byte header length, a JSON "
                         f"header and the tensor data") from None


def from_pretrained(path: str | os.PathLike, dtype: torch.dtype | None = None,
                    device: str | torch.device | None = None, mmap: bool | str = False) -> CausalLM:
    """Load a DeepSeek-V2/V3 Hugging Face directory into a CausalLM (a Kimi-K2.5 one into a VisionLanguageModel,
    a DeepSeek-OCR-2 one into a vision.ocr2_model.Ocr2Model).

    Tensors are streamed one at a time from memory-mapped shards straight into the model's parameters; FP8
    block-quantized weights are dequantized on the way. `device="meta"` builds the model's structure only.
    `dtype` defaults to the checkpoint's floating dtype (bfloat16 for FP8 checkpoints).
    `mmap=True` leaves the weights in their files, paged in when used (mapped_weights.py: for models larger than
    memory; CPU, the checkpoint's own dtype, inference only); `mmap="auto"` does so when they do not fit in memory.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    raw = read_config_json(path / "config.json")
    if raw.get("model_type") in VISION_MODEL_TYPES:  # vision-language: image encoders + projector + a CausalLM
        from .vision.checkpoint import load_vision_language

        return load_vision_language(path, raw, dtype=dtype, device=device)
    if (raw.get("quantization_config") or {}).get("quant_method") == "seekmoe":  # `seekmoe quantize` wrote it
        from .quant.folder import load_quantized

        return load_quantized(path, dtype=dtype, device=device)
    config = config_from_dict(raw, str(path / "config.json"))
    device = torch.device(device or "cpu")
    if device.type == "meta":
        with torch.device("meta"):
            model = CausalLM(config)
        return model if dtype is None else model.to(dtype)

    files = checkpoint_files(path)
    config = _without_absent_mtp(config, files, path)
    stored = _checkpoint_dtype(path, files)
    if dtype is None:
        dtype = stored
    if mmap not in (True, False, "auto"):
        raise ValueError(f"mmap={mmap!r}: expected True, False or 'auto'")
    if mmap == "auto":
        mmap = device.type == "cpu" and _files_exceed_memory(path, files, device)
        if mmap and dtype != stored:
            name = str(stored).removeprefix("torch.")
            raise ValueError(f"{path} does not fit in memory as {str(dtype).removeprefix('torch.')} weights: map its "
                             f"{name} weights from the files instead (`--mmap --dtype {name}`, or "
                             f"from_pretrained(mmap=True))")
        if mmap:
            warnings.warn(f"{path}: the weights do not fit in memory: mapping them from the files (paged in when "
                          f"used; decoding speed then depends on the disk)", MappedLoadNote, stacklevel=2)
    if mmap:
        if device.type != "cpu" or dtype != stored:
            raise ValueError(f"mmap: the weights stay in the files as they are ({str(stored).removeprefix('torch.')}"
                             f", CPU); got dtype {str(dtype).removeprefix('torch.')} on {device.type}: a conversion "
                             f"would copy every weight into memory")
        check_config_bounds(config, str(path))  # before the meta-device model is built
        block = tuple((raw.get("quantization_config") or {}).get("weight_block_size", (128, 128)))
        with torch.device("meta"):
            _Loader(CausalLM(config).to(dtype), path, files, block).check()
        return map_pretrained(path, config, files, dtype, block)
    # Counted from the config alone (one block of each kind), before even the meta-device model is built.
    check_fits_memory(config, dtype.itemsize, f"{str(dtype).removeprefix('torch.')} weights", device,
                      source=str(path))
    with torch.device("meta"):
        model = CausalLM(config)
    # Every shape and every required tensor is checked against the safetensors headers while the model is still on
    # the meta device: a config.json that does not match its weights (or a hostile one) never allocates anything.
    _Loader(model, path, files, (128, 128)).check()
    block = tuple((raw.get("quantization_config") or {}).get("weight_block_size", (128, 128)))
    # Cast on the meta device, then allocate: each tensor is allocated once, in its final dtype and place.
    model = model.to(dtype).to_empty(device=device)
    model.model.rotary_emb.reset_parameters()  # a non-persistent buffer: to_empty left it uninitialized
    loader = _Loader(model, path, files, block)
    loader.load()
    for name, module in model.named_modules():
        if isinstance(module, HashTableRouter):  # a table pointing past the experts would index out of bounds
            module.check_table(f"{path}: {name}.tid2eid")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.eval()
    return model


class MappedLoadNote(UserWarning):
    """from_pretrained(mmap="auto") maps the weights from their files because they do not fit in memory."""


def _files_exceed_memory(path: Path, files: dict[str, str], device: torch.device) -> bool:
    """Whether the safetensors files themselves (not the config's arithmetic, which a hostile config.json can
    inflate) hold more bytes than `device` has available."""
    size = sum((path / name).stat().st_size for name in set(files.values()))
    return size > available_memory(device)[0]


class MissingMTPWarning(UserWarning):
    """config.json declares MTP layers whose weights the checkpoint does not hold; the model loads without them."""


def _without_absent_mtp(config: ModelConfig, files: dict[str, str], path: Path) -> ModelConfig:
    """`config` without MTP modules when the checkpoint holds no tensor of any declared MTP layer (transformers
    never saves them, and many published fine-tunes drop them); a partial MTP layer stays an error later."""
    D, L = config.num_nextn_predict_layers, config.num_hidden_layers
    # DeepSeek-V4's release (and seekmoe's V4 folders) hold them as `mtp.{j}.`; transformers' V4 never saves them
    prefixes = tuple(p for j in range(D) for p in (f"model.layers.{L + j}.", f"mtp.{j}.", f"model.mtp.{j}."))
    if D == 0 or any(key.startswith(prefixes) for key in files):
        return config
    warnings.warn(f"{path}: config.json declares {D} MTP layer(s) (num_nextn_predict_layers) but the checkpoint "
                  f"holds no weights for them: loading without MTP (no speculative decoding)", MissingMTPWarning,
                  stacklevel=3)
    return config.replace(num_nextn_predict_layers=0)


def _checkpoint_dtype(path: Path, files: dict[str, str]) -> torch.dtype:
    first = next(iter(sorted(set(files.values()))))
    with safe_open(str(path / first), "pt") as f:
        for key in f.keys():
            t = f.get_slice(key).get_dtype()
            if t in ("F8_E4M3", "F4"):
                return torch.bfloat16
            if t in ("F32", "BF16", "F16") and not key.endswith(("_scale_inv", ".scale")):
                return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}[t]
    return torch.float32


class _Loader:
    """Copies checkpoint tensors into a materialized model, tracking what was filled."""

    def __init__(self, model: CausalLM, path: Path, files: dict[str, str], block: tuple[int, int]):
        self.model, self.path, self.files, self.block = model, path, files, block
        self.config = model.config
        self.params = dict(model.named_parameters())
        self.params.update(dict(model.named_buffers()))
        self.filled: set[tuple[str, tuple[int, str] | None]] = set()
        self.handles: dict[str, object] = {}
        # Name fragments of parameters the folder may lack, initialized fresh by the caller instead: the lightning
        # indexers a DeepSeek-V3.2 training stage adds to a V3 model (parallel/materialize.py).
        self.fresh: tuple[str, ...] = ()
        # Experts split into a frozen stack and trainable rows (train/freeze.py's TrainableRows, which a sharded
        # load sets before parallelize): the rows are copies of some experts of the stack, kept apart.
        # stack parameter name -> (the rows' parameter name, {expert id: row})
        self.rows_of: dict[str, tuple[str, dict[int, int]]] = {}
        for module_name, module in model.named_modules():
            ids = getattr(module, "ids", None)
            if ".providers." in module_name and ids is not None:
                experts = module_name.rsplit(".providers.", 1)[0]
                for tensor, _ in module.named_parameters(recurse=False):
                    self.rows_of[f"{experts}.{tensor}"] = (f"{module_name}.{tensor}",
                                                           {e: r for r, e in enumerate(ids)})

    def _split_row(self, name: str, index) -> tuple[str, int] | None:
        """(the trainable rows' parameter name, the row) that also take expert slice `index` of `name`, or None."""
        if index is None or name not in self.rows_of or index[0] not in self.rows_of[name][1]:
            return None
        rows_name, row_of = self.rows_of[name]
        return rows_name, row_of[index[0]]

    def _open(self, name: str):
        if name not in self.handles:
            self.handles[name] = safe_open(str(self.path / name), "pt")
        return self.handles[name]

    def _scale_key(self, key: str) -> str | None:
        """The block scales of a quantized weight: `{key}_scale_inv` (V3's release, transformers), or `.scale` beside
        `.weight` (V4's release)."""
        for scale_key in (key + "_scale_inv", key.removesuffix("weight") + "scale"):
            if scale_key != key and scale_key in self.files:
                return scale_key
        return None

    def _is_mxfp4(self, key: str, dtype: str) -> bool:
        """Packed FP4 (two E2M1 values a byte, V4's routed experts): F4, or bytes with block scales."""
        return dtype == "F4" or (dtype in ("I8", "U8") and self._scale_key(key) is not None)

    def _disk_shape(self, key: str) -> tuple[int, ...]:
        """The shape of the (dequantized) tensor `key` from its safetensors header."""
        tensor = self._open(self.files[key]).get_slice(key)
        shape, dtype = tuple(tensor.get_shape()), tensor.get_dtype()
        if dtype in ("I8", "U8") and self._is_mxfp4(key, dtype):  # F4's header already counts values
            shape = (*shape[:-1], 2 * shape[-1])
        return shape

    def _get(self, key: str) -> torch.Tensor:
        tensor = self._open(self.files[key]).get_tensor(key)
        fp4 = getattr(torch, "float4_e2m1fn_x2", None)
        if tensor.dtype == torch.float8_e4m3fn or tensor.dtype in (torch.int8, torch.uint8, fp4):
            scale_key = self._scale_key(key)
            if scale_key is None:
                if tensor.dtype in (torch.int8, torch.uint8):
                    return tensor  # a plain integer tensor (an unquantized table)
                raise ValueError(f"quantized tensor {key} has no {key}_scale_inv (or .scale) in the checkpoint")
            scale = self._open(self.files[scale_key]).get_tensor(scale_key)
            if tensor.dtype == torch.float8_e4m3fn:
                tensor = dequantize_fp8(tensor, e8m0_to_float(scale) if scale.dtype == torch.uint8 else scale,
                                        self.block)
            else:
                tensor = dequantize_mxfp4(tensor, scale)
        return tensor

    def _targets(self):
        """(disk key, our parameter name, expert slice index) for every tensor the model takes from the checkpoint."""
        L, D = self.config.num_hidden_layers, self.config.num_nextn_predict_layers
        by_file: dict[str, list[str]] = {}
        for key, name in self.files.items():
            by_file.setdefault(name, []).append(key)
        for name in sorted(by_file):
            for key in by_file[name]:
                if key.endswith("_scale_inv") or key.endswith(_IGNORED_SUFFIXES):
                    continue
                if self.config.is_v4 and key.endswith(".scale"):  # V4 release's block scales (read by _get)
                    continue
                target = self._target(key, L, D)
                if target is None:
                    continue
                if target[0] not in self.params:
                    raise ValueError(f"checkpoint tensor {key} has no place in this model (expected {target[0]})")
                yield key, target[0], target[1]

    def _destination(self, name: str, index) -> torch.Tensor:
        param = self.params[name]
        return param if index is None else self._expert_slice(param, index, self.config.moe_intermediate_size)

    def check(self) -> None:
        """Compare every tensor's shape in the safetensors headers with the model's (which may be on the meta
        device), and that every tensor the model needs is there. Reads no tensor data."""
        for key, name, index in self._targets():
            dest = self._destination(name, index)
            shape = self._disk_shape(key)
            if tuple(dest.shape) != shape:
                raise ValueError(f"checkpoint tensor {key} has shape {shape}, the model expects "
                                 f"{tuple(dest.shape)} (does config.json match the weights?)")
            self.filled.add((name, index))
            split = self._split_row(name, index)
            if split is not None:
                self.filled.add((split[0], (split[1], index[1])))
        self.handles.clear()
        self._raise_if_missing()
        self.filled.clear()

    def load(self) -> None:
        for key, name, index in self._targets():
            dest = self._destination(name, index)
            tensor = self._get(key)
            if tuple(dest.shape) != tuple(tensor.shape):
                raise ValueError(f"checkpoint tensor {key} has shape {tuple(tensor.shape)}, "
                                 f"the model expects {tuple(dest.shape)} (does config.json match the weights?)")
            with torch.no_grad():
                dest.copy_(tensor.to(dest.dtype))
                split = self._split_row(name, index)
                if split is not None:
                    rows = self.params[split[0]]
                    self._expert_slice(rows, (split[1], index[1]), self.config.moe_intermediate_size).copy_(
                        tensor.to(rows.dtype))
                    self.filled.add((split[0], (split[1], index[1])))
            self.filled.add((name, index))
        self.handles.clear()
        self._raise_if_missing()

    def _raise_if_missing(self) -> None:
        missing = []
        for name_, param in self.params.items():
            if (name_, None) in self.filled or name_.endswith(_IGNORED_SUFFIXES):
                continue
            if any(fragment in name_ for fragment in self.fresh):
                continue
            if name_.endswith("lm_head.weight") and self.config.tie_word_embeddings:
                continue
            # The stacked expert weights (and trainable rows split off them) are filled expert by expert.
            if ".mlp.experts." in name_ and name_.endswith((".gate_up_proj", ".down_proj")):
                parts = ("gate_proj", "up_proj") if name_.endswith("gate_up_proj") else ("down_proj",)
                want = {(name_, (e, p)) for e in range(param.shape[0]) for p in parts}
                if want <= self.filled:
                    continue
            missing.append(name_)
        if missing:
            shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            raise ValueError(f"checkpoint in {self.path} lacks tensors the config requires: {shown}")

    @staticmethod
    def _expert_slice(param: torch.Tensor, index: tuple[int, str], I: int) -> torch.Tensor:
        e, part = index
        if part == "gate_proj":
            return param[e, :I]
        if part == "up_proj":
            return param[e, I:]
        return param[e]

    def _target(self, key: str, L: int, D: int) -> tuple[str, tuple[int, str] | None] | None:
        """Our parameter name for a disk key (and the expert slice), or None for keys we deliberately skip."""
        if self.config.is_v4:
            key = v4_model_key(key)  # transformers' and DeepSeek's V4 names (checkpoint_v4.py)
            m = re.match(r"^model\.mtp\.(\d+)\.", key)
            if m and int(m.group(1)) >= D:
                return None  # MTP modules beyond the configured depth
        m = _LAYER_KEY.match(key)
        if m and int(m.group(1)) >= L:
            j = int(m.group(1)) - L
            if j >= D or m.group(2) in _MTP_SHARED:
                return None  # MTP layers beyond the configured depth, and the repeated shared embedding/head
            key = f"model.mtp.{j}.{m.group(2)}"
        e = _EXPERT_KEY.match(key)
        if e:
            part = e.group(3)
            stacked = "gate_up_proj" if part in ("gate_proj", "up_proj") else "down_proj"
            return f"{e.group(1)}.{stacked}", (int(e.group(2)), part)
        return key, None


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """DeepSeek-V3 FP8 weights: each [block x block] tile of `weight` times its entry of `scale_inv`, in fp32."""
    out_dim, in_dim = weight.shape
    scale = scale_inv.float().repeat_interleave(block[0], 0)[:out_dim].repeat_interleave(block[1], 1)[:, :in_dim]
    return weight.float() * scale


def quantize_fp8(weight: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-quantize a matrix as DeepSeek-V3 is released: float8_e4m3fn weight and fp32 `weight_scale_inv`."""
    out_dim, in_dim = weight.shape
    rows, cols = -(-out_dim // block[0]), -(-in_dim // block[1])
    padded = weight.float().new_zeros(rows * block[0], cols * block[1])
    padded[:out_dim, :in_dim] = weight.float()
    tiles = padded.view(rows, block[0], cols, block[1])
    amax = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12)  # [rows, cols]
    scale_inv = amax / torch.finfo(torch.float8_e4m3fn).max
    q = (tiles / scale_inv[:, None, :, None]).to(torch.float8_e4m3fn).view(rows * block[0], cols * block[1])
    return q[:out_dim, :in_dim].contiguous(), scale_inv


# OCP Microscaling (MX) v1.0: an E2M1 element is sign (bit 3), exponent (bits 2-1, bias 1) and mantissa (bit 0);
# exponent 0 is subnormal (mantissa * 0.5). Indexed by the 4-bit code.
_E2M1_VALUES = [(-1.0) ** (code >> 3) * ((code & 1) * 0.5 if (code >> 1) & 3 == 0
                                          else 2.0 ** (((code >> 1) & 3) - 1) * (1 + (code & 1) / 2))
                for code in range(16)]
MX_BLOCK = 32  # elements sharing one E8M0 scale


def e8m0_to_float(scale: torch.Tensor) -> torch.Tensor:
    """E8M0 scales (float8_e8m0fnu, or their raw bytes as uint8) as fp32: 2^(byte - 127), byte 255 = NaN."""
    if scale.dtype != torch.uint8:
        return scale.float()
    value = torch.exp2(scale.float() - 127.0)
    return torch.where(scale == 255, torch.full_like(value, float("nan")), value)


def dequantize_mxfp4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """MXFP4 weights (DeepSeek-V4's routed experts) as fp32: packed [..., n / 2] holds two E2M1 codes a byte,
    element 2i in the low nibble (float4_e2m1fn_x2's order), and each run of 32 elements along the last dim shares
    the E8M0 scale [..., n / 32] (float8_e8m0fnu, uint8 bytes, or an already-float scale): value = E2M1 * scale."""
    codes = packed.contiguous().view(torch.uint8)
    table = torch.tensor(_E2M1_VALUES, dtype=torch.float32, device=packed.device)
    values = torch.stack([table[(codes & 0xF).long()], table[(codes >> 4).long()]], dim=-1).flatten(-2)
    n = values.shape[-1]
    if scale.shape[-1] * MX_BLOCK != n or scale.shape[:-1] != values.shape[:-1]:
        raise ValueError(f"MXFP4 scales of shape {tuple(scale.shape)} do not fit weights of {tuple(values.shape)} "
                         f"values: expected {(*values.shape[:-1], n // MX_BLOCK)} (one scale per {MX_BLOCK})")
    return values * e8m0_to_float(scale).repeat_interleave(MX_BLOCK, dim=-1)


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [..., n] (n a multiple of 32) as MXFP4: (packed uint8 [..., n / 2], E8M0 scales as uint8 bytes
    [..., n / 32]), each block's scale the power of two putting its largest magnitude at or under 6 (E2M1's max),
    each value rounded to the nearest E2M1 value (for tests and for writing release-format folders)."""
    blocks = weight.float().unflatten(-1, (-1, MX_BLOCK))
    amax = blocks.abs().amax(dim=-1, keepdim=True).clamp(min=2.0 ** -126)
    exponent = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    scaled = blocks / torch.exp2(exponent)
    table = torch.tensor(_E2M1_VALUES, dtype=torch.float32, device=weight.device)
    codes = (scaled.unsqueeze(-1) - table).abs().argmin(dim=-1).flatten(-2).to(torch.uint8)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed, (exponent.squeeze(-1) + 127).to(torch.uint8)
