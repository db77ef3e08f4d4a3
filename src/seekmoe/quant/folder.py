"""Quantized model folders: config.json with a `quantization_config`, the quantized state as safetensors (no pickle),
and the source folder's other files (tokenizer, chat template), so seekmoe reloads them without requantizing.

config.json's `quantization_config` is {"quant_method": "seekmoe", "scheme": "int8"|"int4", "group_size": G (int4),
"embeddings": bool, "dtype": "float32"|"bfloat16"|"float16", "format": "seekmoe-state-dict", "int4_order":
"halves" (int4)}. An int4 folder without `int4_order` was written before it, in the "interleaved" nibble order
(formats.py): its codes are repacked on load, so old folders keep loading. The tensors are the
quantized model's own state dict — `...experts.gate_up_proj.qweight`/`.scale`, `...q_a_proj.weight.qweight`/`.scale`,
float tensors under their usual names — not DeepSeek's per-expert keys: transformers cannot read this format, and
`seekmoe export`'s folders stay the exchange format. Loading builds the model on the meta device, replaces its
modules as quantize_model would (no arithmetic on real weights), and fills every tensor from the file.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..checkpoint import SINGLE_NAME, swap_folder
from ..config import ModelConfig
from ..mapped_weights import DTYPES as SAFETENSORS_DTYPES, read_header
from ..model import CausalLM
from ..model_folder import check_fits_memory, config_from_dict, read_config_json
from .formats import INT4_ORDERS, QuantSpec, bytes_per_weight, int4_from_interleaved
from .modules import QuantizedTensor, quantize_model

QUANT_METHOD = "seekmoe"
FORMAT = "seekmoe-state-dict"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_MODEL_FILES = {"config.json", SINGLE_NAME, "model.safetensors.index.json"}


def quantization_config(raw: dict) -> dict | None:
    """The seekmoe quantization_config of a config.json dict, or None for an unquantized (or FP8) folder."""
    q = raw.get("quantization_config")
    return q if isinstance(q, dict) and q.get("quant_method") == QUANT_METHOD else None


def is_quantized_folder(path: str | os.PathLike) -> bool:
    """Whether `path` holds a folder `seekmoe quantize` wrote."""
    file = Path(path) / "config.json"
    return file.is_file() and quantization_config(read_config_json(file)) is not None


def save_quantized(model: CausalLM, out: str | os.PathLike, source: str | os.PathLike | None = None) -> None:
    """Write the quantized `model` to the folder `out` (config.json + model.safetensors), with the files of the
    folder `source` other than its model files (tokenizer.json, ...). Written beside `out` and renamed into place."""
    if not hasattr(model, "quantization"):
        raise ValueError("the model is not quantized: expected quantize_model(model, ...) first")
    out = Path(out)
    tmp = out.parent / f".{out.name}.saving-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    quant = {"quant_method": QUANT_METHOD, **model.quantization,
             "dtype": str(dtype).removeprefix("torch."), "format": FORMAT}
    if quant["scheme"] == "int4":
        quant["int4_order"] = INT4_ORDERS[0]
    model.config.replace(extra={**model.config.extra, "quantization_config": quant}).save(tmp)
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # the embedding's (tied) or, quantized, stored under lm_head.weight.*
    save_file(unshared(state), str(tmp / SINGLE_NAME), metadata={"format": "pt", "quantization": json.dumps(quant)})
    if source is not None:
        for entry in Path(source).iterdir():
            if entry.name not in _MODEL_FILES and entry.is_file() and not entry.name.endswith(".safetensors"):
                shutil.copy2(entry, tmp / entry.name)
    swap_folder(tmp, out)


def unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` on the CPU, contiguous, a tensor whose storage an earlier one holds (the MTP modules may share the
    head) copied: safetensors refuses shared storage. Only those are copied, so saving a model larger than half the
    memory does not hold it twice."""
    seen: set[int] = set()
    out = {}
    for key, value in state.items():
        t = value.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        out[key] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out


def load_quantized(path: str | os.PathLike, dtype: torch.dtype | None = None,
                   device: str | torch.device | None = None) -> CausalLM:
    """The quantized CausalLM in the folder `path` (written by save_quantized), its float tensors in `dtype`
    (default: the dtype it was quantized in)."""
    path = Path(path)
    raw = read_config_json(path / "config.json")
    quant = quantization_config(raw)
    if quant is None:
        raise ValueError(f"{path} is not a quantized seekmoe folder: expected a config.json quantization_config "
                         f"with quant_method {QUANT_METHOD!r}")
    if quant.get("format") != FORMAT:
        raise ValueError(f"{path}: quantization_config format {quant.get('format')!r}: expected {FORMAT!r}")
    spec = QuantSpec(quant.get("scheme"), int(quant.get("group_size", 32)))
    order = quant.get("int4_order", "interleaved")  # absent: a folder from before the "halves" order
    if spec.scheme == "int4" and order not in INT4_ORDERS:
        raise ValueError(f"{path}: quantization_config int4_order {order!r}: expected one of {INT4_ORDERS}")
    config = config_from_dict(raw, str(path / "config.json"))
    dtype = dtype or DTYPES.get(quant.get("dtype"), torch.float32)
    device = torch.device(device or "cpu")
    file = path / SINGLE_NAME
    if not file.is_file():
        raise FileNotFoundError(f"no {SINGLE_NAME} in {path}")
    # The quantized bytes are what must fit; the float count would refuse models that fit quantized.
    check_fits_memory(config, bytes_per_weight(spec), f"{spec.scheme} weights", device, source=str(path))
    with torch.device("meta"):
        model = CausalLM(config).to(dtype)
    quantize_model(model, spec, embeddings=bool(quant.get("embeddings")))
    model.to_empty(device=device)
    model.model.rotary_emb.reset_parameters()  # a non-persistent buffer: to_empty left it uninitialized
    _fill(model, file, config)
    if spec.scheme == "int4" and order == "interleaved":
        with torch.no_grad():
            for t in model.modules():
                if isinstance(t, QuantizedTensor):
                    t.qweight.copy_(int4_from_interleaved(t.qweight, t.scale.shape[-1]))
    model.eval()
    return model


def _read_into(f, buffer: memoryview, what: str, piece: int = 1 << 28) -> None:
    """Fill `buffer` from the raw file `f`'s position, a piece at a time (one read returns at most ~2 GiB)."""
    done = 0
    while done < len(buffer):
        n = f.readinto(buffer[done:done + piece])
        if not n:
            raise ValueError(f"{what} is cut short (the file ends early)")
        done += n


def _fill(model: CausalLM, file: Path, config: ModelConfig) -> None:
    """Copy every tensor of `file` into `model`'s state, checking names, shapes and dtypes, one tensor at a time.
    Read with plain file reads straight into the model's memory, not through a mapping: a mapped file's pages count
    in the process's resident memory while they are copied out (a 9 GB int4 folder peaked at 2x its size)."""
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    seen = set()
    start, header = read_header(file)
    with open(file, "rb", buffering=0) as f:
        for key, entry in header.items():
            if key not in state:
                raise ValueError(f"{file}: tensor {key} has no place in the quantized model (does config.json's "
                                 f"quantization_config match the weights?)")
            target, dtype, shape = state[key], SAFETENSORS_DTYPES.get(entry["dtype"]), tuple(entry["shape"])
            begin, end = entry["data_offsets"]
            if dtype is None or shape != tuple(target.shape) or (dtype.is_floating_point
                                                                 != target.dtype.is_floating_point):
                raise ValueError(f"{file}: tensor {key} is {entry['dtype']} {shape}, the model expects "
                                 f"{target.dtype} {tuple(target.shape)}")
            into = target.detach() if dtype == target.dtype else torch.empty(shape, dtype=dtype)
            if end - begin != into.nbytes:
                raise ValueError(f"{file}: tensor {key} holds {end - begin} bytes, its shape and dtype need "
                                 f"{into.nbytes}")
            f.seek(start + begin)
            _read_into(f, memoryview(into.view(-1).view(torch.uint8).numpy()), f"{file}: tensor {key}")
            if into is not target.detach():
                with torch.no_grad():
                    target.copy_(into)
            seen.add(key)
    missing = sorted(set(state) - seen)
    if missing:
        raise ValueError(f"{file} lacks {len(missing)} tensors the model needs, e.g. {missing[:3]}")
    if config.tie_word_embeddings and isinstance(model.lm_head, torch.nn.Linear):
        model.lm_head.weight = model.model.embed_tokens.weight
