"""Safetensors written in the model's own order, and models whose weights stay in their files (memory-mapped).

`from_pretrained(path, mmap=True)` builds the model with every parameter a view into its safetensors file, mapped
copy-on-write (MAP_PRIVATE): nothing is read at load, and the operating system pages weights in when a forward
touches them and drops them again under memory pressure (they are clean file pages), as llama.cpp's mmap does. A
decoding step reads the dense weights and only the experts its tokens are routed to (the "gathered" experts
backend indexes the stacks), so a model larger than memory decodes, paced by the disk for experts not yet resident.

Our modules hold routed experts stacked ([E, 2I, H] and [E, H, I]); the checkpoint holds them per expert. The
stacks are views of the file only where the file stores an expert stack contiguously, gate then up rows of expert 0,
then of expert 1, ...: what `write_safetensors` (used by `save_pretrained`) writes, keeping the order it is given
instead of sorting tensors by name as safetensors' own writer does. Layers of other files (DeepSeek's releases) are
copied into memory, and `MappedModel.copied_bytes` says how much.
"""

from __future__ import annotations

import json
import os
import struct
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_NAMES = {v: k for k, v in DTYPES.items()}


# ----------------------------------------------------------------------------------------------------- writing
def write_safetensors(file: str | os.PathLike, specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                      tensors: Iterable[torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file whose data holds `tensors` in the order of `specs` (name, dtype, shape), streamed:
    the header comes from the specs, then each tensor is written as it is produced. Each offset must be a multiple of
    its tensor's element size (list wider dtypes first), so that every tensor can be mapped in place."""
    header: dict = {"__metadata__": dict(metadata or {})}
    offset = 0
    for name, dtype, shape in specs:
        if offset % dtype.itemsize:
            raise ValueError(f"{name} ({dtype}) would start at byte {offset}, not a multiple of its element size: "
                             f"list wider dtypes first")
        nbytes = dtype.itemsize * _numel(shape)
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)  # the data starts 8-byte aligned (the format allows trailing spaces)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        count = 0
        for (name, dtype, shape), tensor in zip(specs, tensors, strict=True):
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise ValueError(f"{name}: got {tensor.dtype} {tuple(tensor.shape)}, the header says {dtype} {shape}")
            flat = tensor.detach().to("cpu").contiguous().reshape(-1)
            f.write(memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else b"")
            count += 1


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def write_items(file: str | os.PathLike, items: list[tuple[str, torch.Tensor]], metadata: dict | None = None) -> None:
    """`write_safetensors` for tensors in hand: in their given order, wider dtypes first (a stable sort)."""
    items = sorted(items, key=lambda kv: -kv[1].element_size())
    write_safetensors(file, [(k, t.dtype, tuple(t.shape)) for k, t in items], (t for _, t in items), metadata)


# ----------------------------------------------------------------------------------------------------- mapping
def read_header(file: Path) -> tuple[int, dict]:
    """(byte offset of the data, the JSON header without __metadata__) of a safetensors file."""
    with open(file, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


class _MappedFile:
    """A safetensors file mapped copy-on-write; `view(key)` is a tensor over its bytes (no read, no copy)."""

    def __init__(self, file: Path):
        self.start, self.header = read_header(file)
        size = file.stat().st_size
        # shared=False: MAP_PRIVATE, so writes (none are expected) would never reach the checkpoint.
        storage = torch.UntypedStorage.from_file(str(file), shared=False, nbytes=size)
        self.bytes = torch.empty(0, dtype=torch.uint8).set_(storage)

    def span(self, key: str) -> tuple[int, int]:
        begin, end = self.header[key]["data_offsets"]
        return self.start + begin, self.start + end

    def dtype(self, key: str) -> torch.dtype | None:
        """The tensor's dtype; None for one torch cannot view (FP4 pairs: they are dequantized, copied)."""
        return DTYPES.get(self.header[key]["dtype"])

    def view(self, key: str, begin: int | None = None, end: int | None = None, shape=None) -> torch.Tensor | None:
        """The tensor `key` (or the bytes begin:end read as its dtype in `shape`), or None where the bytes are not
        aligned to its element size (then it is read by copying)."""
        dtype = self.dtype(key)
        if dtype is None:
            return None
        if begin is None:
            begin, end = self.span(key)
            shape = self.header[key]["shape"]
        if begin % dtype.itemsize:
            return None
        return self.bytes[begin:end].view(dtype).view(shape)


@dataclass
class MappingReport:
    """How a mapped load went: bytes left in the files (mapped) and bytes copied into memory, with the reasons."""

    mapped_bytes: int = 0
    copied_bytes: int = 0
    copied: tuple[str, ...] = ()


def map_state(model, path: Path, files: dict[str, str], dtype: torch.dtype,
              block: tuple[int, int] = (128, 128)) -> tuple[dict, MappingReport]:
    """Our state-dict entries for `model` (on the meta device, already checked against the files) as views of the
    mapped safetensors: a stacked expert tensor is one view where the file holds it contiguously, else a copy
    (also of quantized weights, dequantized as the ordinary load does; `block` is their FP8 tile)."""
    from .checkpoint import _Loader

    loader = _Loader(model, path, files, block)
    mapped = {name: _MappedFile(path / name) for name in sorted(set(files.values()))}
    report = MappingReport()
    copied: list[str] = []
    state: dict[str, torch.Tensor] = {}
    stacks: dict[str, dict[tuple[int, str], str]] = {}
    targets = dict(model.named_parameters())
    targets.update(model.named_buffers())
    for key, name, index in loader._targets():
        if index is not None:
            stacks.setdefault(name, {})[index] = key
            continue
        f = mapped[files[key]]
        t = f.view(key)
        target = targets[name]
        if t is None or t.dtype != target.dtype:
            t = loader._get(key).to(target.dtype)
            report.copied_bytes += t.numel() * t.element_size()
            copied.append(key)
        else:
            report.mapped_bytes += t.numel() * t.element_size()
        state[name] = t
    I = model.config.moe_intermediate_size
    for name, parts in stacks.items():
        shape = tuple(model.get_parameter(name).shape)
        order = [(e, p) for e in range(shape[0]) for p in
                 (("gate_proj", "up_proj") if name.endswith("gate_up_proj") else ("down_proj",))]
        t = _contiguous_stack([parts[i] for i in order], files, mapped, shape, dtype)
        if t is None:  # not laid out as a stack in the file: assemble it in memory
            t = torch.empty(shape, dtype=dtype)
            for (e, p), key in ((i, parts[i]) for i in order):
                dest = t[e, :I] if p == "gate_proj" else t[e, I:] if p == "up_proj" else t[e]
                dest.copy_(loader._get(key))
            report.copied_bytes += t.numel() * t.element_size()
            copied.append(name)
        else:
            report.mapped_bytes += t.numel() * t.element_size()
        state[name] = t
    report.copied = tuple(copied)
    return state, report


def _contiguous_stack(keys: list[str], files: dict[str, str], mapped: dict[str, _MappedFile], shape,
                      dtype: torch.dtype) -> torch.Tensor | None:
    """One view over `keys` when they sit back to back in one file in this order, in `dtype`; else None."""
    if len({files[k] for k in keys}) != 1:
        return None
    f = mapped[files[keys[0]]]
    if any(f.dtype(k) != dtype for k in keys):
        return None
    begin, end = f.span(keys[0])
    for k in keys[1:]:
        b, e = f.span(k)
        if b != end:
            return None
        end = e
    return f.view(keys[0], begin, end, shape)


def map_pretrained(path: Path, config, files: dict[str, str], dtype: torch.dtype,
                   block: tuple[int, int] = (128, 128)):
    """The CausalLM of the model folder `path` with its weights left in the (mapped) files; see the module
    docstring. `dtype` must be the checkpoint's: a conversion would copy every weight."""
    from .model import CausalLM
    from .model.experts import configure_experts

    with torch.device("meta"):
        model = CausalLM(config)
    model = model.to(dtype)
    state, report = map_state(model, path, files, dtype, block)
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    for module in model.modules():  # non-persistent buffers (RoPE's inverse frequencies) are computed, not loaded
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta:
                module._buffers[name] = torch.empty_like(buf, device="cpu")
    model.model.rotary_emb.reset_parameters()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"checkpoint in {path} lacks tensors the config requires: {', '.join(left[:8])}")
    for p in model.parameters():
        p.requires_grad_(False)  # a mapped model is for inference: no optimizer may write into the file's pages
    configure_experts(model)  # the backend was chosen on the meta device
    model.mapping = report
    if report.copied_bytes:
        warnings.warn(f"{path}: {report.copied_bytes / 2**20:.0f} MiB of weights were copied into memory instead of "
                      f"mapped ({', '.join(report.copied[:3])}{' ...' if len(report.copied) > 3 else ''}: not laid "
                      f"out as stacks, or another dtype); `model.save_pretrained` writes folders that map whole",
                      stacklevel=3)
    return model.eval()


# ----------------------------------------------------------------------------------------------------- memory
def memory_stats() -> dict[str, int]:
    """This process's memory in bytes: peak resident (ru_maxrss), resident now, and of that the anonymous (private)
    and file-backed (mapped weights, reclaimable) parts, from /proc/self/status where there is one."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    stats = {"peak_rss": peak if sys.platform == "darwin" else peak * 1024}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                stats[{"VmRSS": "rss", "RssAnon": "rss_anon", "RssFile": "rss_file"}[key]] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return stats
