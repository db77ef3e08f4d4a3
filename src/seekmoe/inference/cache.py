"""Decoding caches: per layer and token what that layer's attention keeps (MLA: only the latent c_kv and the rope
key k_pe), and the plan of one step's writes and reads."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CacheStep:
    """Where one forward's new tokens go: positions [B, S] (also their RoPE positions), the cache row of each batch
    row `slots` [B], the column each new token is written to `write_at` [B, S], and the mask attn_mask [B, 1, S, T]
    (True = may attend) over the T cached tokens the step reads. `rows` is `slots` as a slice when consecutive.
    `causal` says the mask is the plain causal one over the new tokens alone (every slot starts empty and S = T: a
    first prefill chunk), so attention may use a fused causal kernel instead of reading the mask."""

    positions: torch.Tensor
    attn_mask: torch.Tensor
    slots: torch.Tensor
    write_at: torch.Tensor
    rows: slice | None = None
    causal: bool = False


class DecodeCache:
    """Preallocated decoding caches for `batch_size` sequences ("slots") of up to `max_len` tokens each.

    Each layer's attention says what it keeps per token (`cache_widths()`: MLA keeps {"c_kv": kv_lora_rank,
    "k_pe": qk_rope_head_dim}); `tensors[layer][name]` is [batch_size, max_len + 1, width], the extra last column
    absorbing the writes of padding tokens. Layers may differ (V4's layer types). `lengths[slot]` counts the tokens a
    slot holds; a step writes its new tokens right after them, and `commit` advances a slot by the tokens it keeps
    (speculative decoding keeps fewer than it wrote: the rest are simply overwritten later).
    """

    def __init__(self, widths: list[dict[str, int]], batch_size: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"DecodeCache needs batch_size >= 1 and max_len >= 1, got {batch_size} and {max_len}")
        self.max_len = max_len
        self.device = torch.device(device or "cpu")
        self.tensors = [{name: torch.zeros(batch_size, max_len + 1, width, dtype=dtype, device=device)
                         for name, width in layer.items()} for layer in widths]
        self.lengths = [0] * batch_size

    @classmethod
    def for_attention(cls, attention: list, batch_size: int, max_len: int, dtype: torch.dtype,
                      device: torch.device | str | None = None) -> "DecodeCache":
        """A cache for these attention modules (one layer each), shaped by their `cache_widths()`."""
        return cls([a.cache_widths() for a in attention], batch_size, max_len, dtype, device)

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int, dtype: torch.dtype,
                  device: torch.device | str | None = None) -> "DecodeCache":
        """A cache for `model`'s decoder layers."""
        return cls.for_attention([layer.self_attn for layer in model.model.layers], batch_size, max_len, dtype,
                                 device)

    @classmethod
    def for_mtp(cls, model, depth: int, batch_size: int, max_len: int, dtype: torch.dtype,
                device: torch.device | str | None = None) -> "DecodeCache":
        """A one-layer cache for `model`'s MTP module `depth` (1-based)."""
        return cls.for_attention([model.model.mtp[depth - 1].self_attn], batch_size, max_len, dtype, device)

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    def bytes_per_token(self) -> int:
        """The sum of every layer's per-token widths times the dtype's size (MLA: (kv_lora_rank +
        qk_rope_head_dim) x layers x size)."""
        return sum(t.shape[-1] * t.element_size() for layer in self.tensors for t in layer.values())

    def reset(self, slot: int) -> None:
        """Empty a slot for a new sequence."""
        self.lengths[slot] = 0

    def commit(self, slot: int, n_tokens: int) -> None:
        """Keep the first `n_tokens` that the last step wrote to `slot`."""
        self.lengths[slot] += n_tokens

    def step(self, slots: list[int], n_new: list[int], width: int, batch: int | None = None,
             full_length: bool = False) -> CacheStep:
        """Plan a forward of `width` tokens per slot, of which the first `n_new[i]` are real (the rest padding).

        For shapes that do not change from step to step (CUDA graphs): `batch` pads the batch with rows that write
        only to the spare column, and `full_length` makes the step read every column of the cache (T = max_len + 1,
        the mask hiding what is not there yet) instead of the longest slot's tokens."""
        device = self.device
        for s, n in zip(slots, n_new):
            if self.lengths[s] + n > self.max_len:
                raise ValueError(f"slot {s} would hold {self.lengths[s] + n} tokens: expected at most the cache's "
                                 f"max_len={self.max_len}")
        pad = (batch or len(slots)) - len(slots)
        if pad < 0:
            raise ValueError(f"batch={batch} is smaller than the {len(slots)} slots of the step")
        lengths, n_new = [self.lengths[s] for s in slots] + [0] * pad, list(n_new) + [0] * pad
        start = torch.tensor(lengths, device=device)
        positions = start[:, None] + torch.arange(width, device=device)  # [B, S]
        real = torch.arange(width, device=device) < torch.tensor(n_new, device=device)[:, None]
        write_at = torch.where(real, positions, self.max_len)  # padding goes to the spare column
        T = self.max_len + 1 if full_length else max(n + m for n, m in zip(lengths, n_new))
        attn_mask = (torch.arange(T, device=device) <= positions[..., None]).unsqueeze(1)  # [B, 1, S, T]
        # Padding rows attend to column 0 of their (borrowed) slot: a harmless, finite row.
        attn_mask[len(slots):, ..., 0] = True
        rows = _as_slice(slots) if not pad else None
        causal = not pad and T == width and not any(lengths)
        return CacheStep(positions, attn_mask, torch.tensor(slots + slots[:1] * pad, device=device), write_at, rows,
                         causal)

    def layers(self, step: CacheStep) -> list["CacheLayer"]:
        """The per-layer views of this cache that the model's attention reads and writes during `step`."""
        return cache_layers(self.tensors, step)


# The name of the MLA-only cache this one generalizes.
LatentCache = DecodeCache


def cache_layers(tensors: list[dict[str, torch.Tensor]], step: CacheStep) -> list["CacheLayer"]:
    """Per-layer views of the cache tensors (per layer, name -> [batch, max_len + 1, width]) for `step` (a plain
    function of tensors, so that a compiled forward can build them itself)."""
    return [CacheLayer(layer, step) for layer in tensors]


class CacheLayer:
    """One layer of a `DecodeCache` during one step: what an attention module calls `update` on. The step's
    `positions` [B, S], `attn_mask` [B, 1, S, T] and `causal` flag are there for attention that needs them (sliding
    windows, compression, the indexer's top-k)."""

    def __init__(self, tensors: dict[str, torch.Tensor], step: CacheStep):
        self.tensors = tensors
        self.rows, self.slots, self.write_at = step.rows, step.slots, step.write_at
        self.positions, self.attn_mask = step.positions, step.attn_mask
        self.kv_len = step.attn_mask.shape[-1]
        self.causal = step.causal  # see CacheStep.causal

    def update(self, **new: torch.Tensor) -> dict[str, torch.Tensor]:
        """Write each named tensor [B, S, width] at the step's positions; return, by name, the slots' first T
        cached tokens [B, T, width] (these new ones included)."""
        index = (self.slots[:, None], self.write_at)
        out = {}
        for name, values in new.items():
            stored = self.tensors[name]
            stored.index_put_(index, values.to(stored.dtype))
            if self.rows is not None:  # contiguous slots: a view, no copy
                out[name] = stored[self.rows, : self.kv_len]
            else:
                out[name] = stored[:, : self.kv_len].index_select(0, self.slots)
        return out


def _as_slice(slots: list[int]) -> slice | None:
    """slots as a slice when they are consecutive ascending, else None."""
    if slots == list(range(slots[0], slots[0] + len(slots))):
        return slice(slots[0], slots[0] + len(slots))
    return None
