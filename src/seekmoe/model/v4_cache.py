"""DeepSeek-V4's decoding state of one layer: the sliding window's last keys, and per compressor (the layer's, and
CSA's indexer) the tokens of the window still open, the previous window's first series (overlapping windows) and
the compressed keys so far. What grows with the context is one compressed key per `rate` tokens (plus the
indexer's); the window and the open window are bounded.

Keys are concatenated as tokens arrive (eager decoding; every sequence of the batch at the same positions). What is
kept past a step is copied out of the step's tensors (`_own`): a slice would keep the whole step's projections alive
(after a 1K-token prefill, ~4x the cache itself), so the bytes held are what `seekmoe info` counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .v4_compressor import Compressor


def _own(t: torch.Tensor) -> torch.Tensor:
    """t in storage of its own size (a copy where t is a view into a larger tensor)."""
    return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()


@dataclass
class CompressorState:
    """One compressor's state: the open window's projections, the overlap, the compressed keys [B, n, head_dim]."""

    kv: torch.Tensor | None = None  # [B, < rate, width] projections of the open window's tokens
    gate: torch.Tensor | None = None
    prior: tuple[torch.Tensor, torch.Tensor] | None = None  # previous window's first series (kv, gate) [B, rate, D]
    keys: torch.Tensor | None = None  # [B, n, head_dim]
    windows: int = 0  # compressed keys so far

    def step(self, compressor: Compressor, x: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
        """Take the new tokens x [B, S, hidden]; close every window they complete; return all keys [B, n, D]."""
        kv, gate = compressor.project(x)
        if self.kv is not None:
            kv, gate = torch.cat([self.kv, kv], dim=1), torch.cat([self.gate, gate], dim=1)
        m = compressor.rate
        usable = kv.shape[1] // m * m
        self.kv, self.gate = _own(kv[:, usable:]), _own(gate[:, usable:])
        if usable:
            keys = compressor.pool(kv[:, :usable], gate[:, :usable], self.windows * m, inv_freq, self.prior)
            if compressor.overlap:  # the last closed window's first series, with its position bias
                D = compressor.head_dim
                last_gate = gate[:, usable - m:usable] + compressor.position_bias
                self.prior = (_own(kv[:, usable - m:usable, :D]), _own(last_gate[..., :D]))
            self.keys = _own(keys) if self.keys is None else torch.cat([self.keys, keys], dim=1)
            self.windows += usable // m
        if self.keys is None:
            self.keys = kv.new_zeros(kv.shape[0], 0, compressor.head_dim)
        return self.keys


@dataclass
class V4LayerCache:
    """One V4 layer's decoding state; `seen` tokens so far (the next token's position)."""

    sliding_window: int
    seen: int = 0
    window: torch.Tensor | None = None  # [B, < sliding_window, head_dim] the last keys
    compressor: CompressorState = field(default_factory=CompressorState)
    indexer: CompressorState = field(default_factory=CompressorState)

    def keys(self, kv: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Append this step's keys kv [B, S, D]: (the window's keys and the new ones [B, W', D], the position of the
        first of them); keeps the last sliding_window - 1 for the next step."""
        full = kv if self.window is None else torch.cat([self.window, kv], dim=1)
        first = self.seen - (0 if self.window is None else self.window.shape[1])
        self.window = _own(full[:, -(self.sliding_window - 1):] if self.sliding_window > 1 else full[:, :0])
        self.seen += kv.shape[1]
        return full, first

    def nbytes(self) -> int:
        """Bytes of the storages this cache keeps alive now, each counted once (what memory it holds, for measuring
        the cache against `seekmoe info`'s per-token arithmetic)."""
        tensors = [self.window]
        for state in (self.compressor, self.indexer):
            tensors += [state.kv, state.gate, state.keys, *(state.prior or ())]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t is not None}
        return sum(storages.values())
