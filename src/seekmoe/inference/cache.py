"""MLA's decoding cache: per layer and token only the latent c_kv (kv_lora_rank) and the rope key k_pe."""

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


class LatentCache:
    """Preallocated latents for `batch_size` sequences ("slots") of up to `max_len` tokens each.

    c_kv [layers, batch_size, max_len + 1, kv_lora_rank] and k_pe [layers, batch_size, max_len + 1, rope_dim]; the
    extra last column absorbs the writes of padding tokens. `lengths[slot]` counts the tokens a slot holds; a step
    writes its new tokens right after them, and `commit` advances a slot by the tokens it keeps (speculative
    decoding keeps fewer than it wrote: the rest are simply overwritten later).
    """

    def __init__(self, n_layers: int, batch_size: int, max_len: int, kv_lora_rank: int, qk_rope_head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"LatentCache needs batch_size >= 1 and max_len >= 1, got {batch_size} and {max_len}")
        self.max_len = max_len
        self.c_kv = torch.zeros(n_layers, batch_size, max_len + 1, kv_lora_rank, dtype=dtype, device=device)
        self.k_pe = torch.zeros(n_layers, batch_size, max_len + 1, qk_rope_head_dim, dtype=dtype, device=device)
        self.lengths = [0] * batch_size

    @classmethod
    def for_model(cls, config, n_layers: int, batch_size: int, max_len: int, dtype: torch.dtype,
                  device: torch.device | str | None = None) -> "LatentCache":
        """A cache shaped for `config`'s MLA, for `n_layers` layers (the decoder's, or an MTP module's one)."""
        return cls(n_layers, batch_size, max_len, config.kv_lora_rank, config.qk_rope_head_dim, dtype, device)

    @property
    def batch_size(self) -> int:
        return self.c_kv.shape[1]

    def bytes_per_token(self) -> int:
        """(kv_lora_rank + qk_rope_head_dim) x layers x dtype size."""
        n_layers, _, _, rank = self.c_kv.shape
        return (rank + self.k_pe.shape[-1]) * n_layers * self.c_kv.element_size()

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
        device = self.c_kv.device
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

    def layers(self, step: CacheStep) -> list["LatentCacheLayer"]:
        """The per-layer views of this cache that the model's attention reads and writes during `step`."""
        return cache_layers(self.c_kv, self.k_pe, step)


def cache_layers(c_kv: torch.Tensor, k_pe: torch.Tensor, step: CacheStep) -> list["LatentCacheLayer"]:
    """Per-layer views of the cache tensors c_kv [layers, batch, max_len + 1, rank] and k_pe for `step` (a plain
    function of tensors, so that a compiled forward can build them itself)."""
    T = step.attn_mask.shape[-1]
    return [LatentCacheLayer(c_kv[i], k_pe[i], step.rows, step.slots, step.write_at, T, step.causal)
            for i in range(c_kv.shape[0])]


class LatentCacheLayer:
    """One layer of a `LatentCache` during one step: what `MultiHeadLatentAttention` calls `update` on."""

    def __init__(self, c_kv: torch.Tensor, k_pe: torch.Tensor, rows: slice | None, slots: torch.Tensor,
                 write_at: torch.Tensor, kv_len: int, causal: bool = False):
        self.c_kv, self.k_pe = c_kv, k_pe  # [batch, max_len + 1, kv_lora_rank], [batch, max_len + 1, rope_dim]
        self.rows, self.slots, self.write_at, self.kv_len = rows, slots, write_at, kv_len
        self.causal = causal  # see CacheStep.causal

    def update(self, c_kv: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write c_kv [B, S, kv_lora_rank] and k_pe [B, S, rope_dim]; return the slots' first T cached tokens."""
        index = (self.slots[:, None], self.write_at)
        self.c_kv.index_put_(index, c_kv.to(self.c_kv.dtype))
        self.k_pe.index_put_(index, k_pe.to(self.k_pe.dtype))
        if self.rows is not None:  # contiguous slots: a view, no copy
            return self.c_kv[self.rows, : self.kv_len], self.k_pe[self.rows, : self.kv_len]
        return (self.c_kv[:, : self.kv_len].index_select(0, self.slots),
                self.k_pe[:, : self.kv_len].index_select(0, self.slots))


def _as_slice(slots: list[int]) -> slice | None:
    """slots as a slice when they are consecutive ascending, else None."""
    if slots == list(range(slots[0], slots[0] + len(slots))):
        return slice(slots[0], slots[0] + len(slots))
    return None
