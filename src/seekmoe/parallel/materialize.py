"""Materializing a model built on the meta device: each rank allocates only its own shards (`to_empty`), then fills
them either from a model folder's safetensors, reading only the slices it owns, or with the one-process
initialization, drawing each tensor in full one at a time and keeping its slice. No rank ever holds the whole model.

The order is: build on meta (`build_model(config, device="meta")`), check the folder's headers against it
(`check_folder`), `parallelize` (FSDP2 shards dim 0 of every parameter; expert parallelism owns whole experts), then
`materialize`. Works on a plain (one-process) meta model too: every tensor is then its own whole shard.

Costs: a load reads each rank's slices (`safe_open(...).get_slice`), whole experts for the stacked expert weights, and
FP8 rows with the scale blocks around them; one shard file is mapped at a time. A fresh initialization draws every
tensor in full on every rank (the random stream must advance as in one process): time as for the whole model,
memory for its largest tensor only.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from ..checkpoint import _Loader, checkpoint_files, dequantize_fp8
from ..model_folder import read_config_json
from ..model.transformer import init_module

# torch.nn modules that draw their weights once in __init__ (before CausalLM.reset_parameters draws them again):
# replayed so that the random stream, hence every weight, matches a model built and initialized in one process.
_DRAWN_AT_CONSTRUCTION = (nn.Linear, nn.Embedding)


def local_box(tensor: torch.Tensor) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """(this rank's local tensor, written in place, and the slices of the global tensor it holds)."""
    if not isinstance(tensor, DTensor):
        return tensor, tuple(slice(0, n) for n in tensor.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return tensor.to_local(), tuple(slice(o, o + n) for o, n in zip(offset, shape))


def check_folder(model: nn.Module, folder: str | Path) -> None:
    """Compare the safetensors headers of `folder` with `model` (still plain, on the meta device): every shape and
    every required tensor, reading no tensor data. Raises ValueError naming the first mismatch."""
    folder = Path(folder)
    loader = _Loader(model, folder, checkpoint_files(folder), (128, 128))
    loader.fresh = added_modules(model, folder)
    loader.check()


def added_modules(model: nn.Module, folder: str | Path) -> tuple[str, ...]:
    """Name fragments of the modules `model` has and the model of `folder` cannot have, to be initialized rather
    than loaded: the lightning indexers of a DeepSeek-V3.2 model made from a V3 one (`seekmoe train --init-from
    V3_DIR --dsa-stage warmup index_topk=N`, as V3.2 was made from V3.1)."""
    if model.config.index_topk is not None and read_config_json(Path(folder) / "config.json").get("index_topk") is None:
        return (".self_attn.indexer.",)
    return ()


def materialize(model: nn.Module, device: torch.device, folder: str | Path | None = None) -> nn.Module:
    """Allocate this rank's shards of the meta-device `model` on `device` and fill them from `folder`'s weights, or
    (no folder) as one process would initialize them after the same `torch.manual_seed`."""
    model.to_empty(device=device)
    embedding, head = model.model.embed_tokens.weight, model.lm_head.weight
    if model.config.tie_word_embeddings and not isinstance(head, DTensor) and head is not embedding:
        model.lm_head.weight = embedding  # to_empty gave each module its own new tensor (FSDP keeps one)
    with torch.no_grad():
        if folder is None:
            init_shards(model)
        else:
            loader = ShardedLoader(model, Path(folder))
            loader.fresh = added_modules(model, folder)
            loader.load()
            if loader.fresh:
                init_shards(model, only=loader.fresh)
            for module in model.modules():
                # Non-persistent buffers (rope frequencies) are in no checkpoint: to_empty left them as whatever
                # memory held. Every module that has one recomputes it; a class list here once missed V4's rope,
                # which gave losses off by ~1e-3 or NaN from run to run.
                if module._non_persistent_buffers_set:
                    if not hasattr(module, "reset_parameters"):
                        raise TypeError(f"{type(module).__name__} has a non-persistent buffer but no "
                                        "reset_parameters() to recompute it after loading")
                    module.reset_parameters()
    return model


def _twin(module: nn.Module) -> nn.Module:
    """A shallow copy of `module` whose own parameters and buffers are fresh full-size CPU tensors (no children)."""
    # The module's own class, not FSDP2's wrapper class (whose __new__ would re-run __init__), same attributes.
    cls = next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))
    twin = object.__new__(cls)
    twin.__dict__.update(module.__dict__)
    twin.__dict__["_parameters"] = {n: None if p is None else torch.empty(p.shape, dtype=p.dtype)
                                    for n, p in module._parameters.items()}
    twin.__dict__["_buffers"] = {n: None if b is None else torch.empty(b.shape, dtype=b.dtype)
                                 for n, b in module._buffers.items()}
    twin.__dict__["_modules"] = {}
    return twin


@torch.no_grad()
def init_shards(model: nn.Module, only: tuple[str, ...] = ()) -> None:
    """CausalLM's initialization into this rank's shards, bit for bit the weights `CausalLM(config)` gets in one
    process after the same seed: the random draws of construction are replayed, then each module's tensors are
    drawn in full on the CPU (one module at a time, so at most the largest tensor is ever whole) and sliced.
    `only`: initialize just the modules whose names contain one of these fragments (modules a folder lacks)."""
    std = model.config.initializer_range
    for module in model.modules() if not only else ():  # construction: nn.Linear / nn.Embedding draw their own
        if isinstance(module, _DRAWN_AT_CONSTRUCTION):
            type(module).reset_parameters(_twin(module))
    drawn: dict[str, dict[str, torch.Tensor]] = {}  # module name -> its full tensors, for trainable rows below
    for module_name, module in model.named_modules():
        own = dict(module.named_parameters(recurse=False)) | dict(module.named_buffers(recurse=False))
        if not own or (only and not any(f in module_name + "." for f in only)):
            continue
        ids = getattr(module, "ids", None)
        if ".providers." in module_name and ids is not None:
            # Trainable rows (train/freeze.py) are copies of some experts of the stack drawn just before: no draw.
            stack = drawn[module_name.rsplit(".providers.", 1)[0]]
            full = {name: stack[name][torch.tensor(ids)] for name in own}
        else:
            twin = _twin(module)
            if not init_module(twin, std):
                raise TypeError(f"no initialization known for {type(module).__name__} (it holds {sorted(own)}): "
                                f"add it to model.transformer.init_module")
            full = dict(twin.named_parameters(recurse=False)) | dict(twin.named_buffers(recurse=False))
            if module_name.endswith(".experts"):
                drawn[module_name] = full
        for name, tensor in own.items():
            local, box = local_box(tensor)
            local.copy_(full[name][box])


class ShardedLoader(_Loader):
    """checkpoint.py's loader, reading into each parameter only the slice this rank holds: `get_slice` rows for a
    sharded matrix, whole experts for the stacked expert weights (sharded by expert)."""

    def __init__(self, model: nn.Module, path: Path):
        quantization = read_config_json(path / "config.json").get("quantization_config") or {}
        block = tuple(quantization.get("weight_block_size", (128, 128)))
        super().__init__(model, path, checkpoint_files(path), block)

    def load(self) -> None:
        I = self.config.moe_intermediate_size
        current = None
        for key, name, index in self._targets():  # file by file
            if self.files[key] != current:
                # One shard file mapped at a time: the pages read from a file leave this process with it.
                current = self.files[key]
                self.handles.clear()
            local, box = local_box(self.params[name])
            if index is None:
                local.copy_(self.read(key, box))
            else:
                e, part = index
                if any(b != slice(0, n) for b, n in zip(box[1:], self.params[name].shape[1:])):
                    raise NotImplementedError(f"{name} is sharded along a dimension other than its experts")
                first, last = box[0].start, box[0].stop
                if first <= e < last:
                    self._expert_slice(local, (e - first, part), I).copy_(self.read(key, None))
                split = self._split_row(name, index)
                if split is not None:
                    self._fill_row(*split, part, key, I)
            self.filled.add((name, index))
        self.handles.clear()
        self._raise_if_missing()

    def _fill_row(self, rows_name: str, row: int, part: str, key: str, I: int) -> None:
        """An expert's `part` into its row `row` of the trainable rows `rows_name`, where this rank holds that row."""
        local, box = local_box(self.params[rows_name])
        if box[0].start <= row < box[0].stop:
            self._expert_slice(local, (row - box[0].start, part), I).copy_(self.read(key, None))
        self.filled.add((rows_name, (row, part)))

    def read(self, key: str, box: tuple[slice, ...] | None) -> torch.Tensor:
        """The slices `box` (None = all) of checkpoint tensor `key`, FP8 block-scaled weights dequantized (only
        the scale blocks that cover those rows)."""
        source = self._open(self.files[key]).get_slice(key)
        if source.get_dtype() != "F8_E4M3":
            return source[box] if box is not None else source[:]
        scale_key = key + "_scale_inv"
        if scale_key not in self.files:
            raise ValueError(f"FP8 tensor {key} has no {scale_key} in the checkpoint")
        rows, cols = source.get_shape()
        row_box = box[0] if box is not None else slice(0, rows)
        if box is not None and box[1:] != (slice(0, cols),):
            raise NotImplementedError(f"FP8 tensor {key} is sharded along its columns")
        # Whole scale blocks around the wanted rows, dequantized, then cut to those rows.
        b = self.block[0]
        first, last = row_box.start // b, -(-row_box.stop // b)
        weight = source[first * b:min(last * b, rows)]
        scale = self._open(self.files[scale_key]).get_slice(scale_key)[first:last]
        rows_out = dequantize_fp8(weight, scale, self.block)
        return rows_out[row_box.start - first * b:row_box.stop - first * b]
