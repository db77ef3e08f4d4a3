"""Packing token streams into fixed-length sequences, and a resumable shuffled order over them."""

from __future__ import annotations

import numpy as np
import torch


class PackedSequences:
    """A token stream cut into non-overlapping sequences of `seq_len` tokens (documents run on across EOS)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, split: str = "train"):
        if seq_len < 2:
            raise ValueError(f"seq_len={seq_len} is invalid: expected at least 2 tokens")
        self.tokens = tokens
        self.seq_len = seq_len
        if len(self) == 0:
            raise ValueError(f"the {split} split has {len(tokens)} tokens, fewer than one sequence of "
                             f"seq_len={seq_len}: use more data or a shorter seq_len")

    def __len__(self) -> int:
        return len(self.tokens) // self.seq_len

    def batch(self, indices) -> torch.Tensor:
        """Sequences `indices` as a [len(indices), seq_len] int64 tensor."""
        rows = [np.asarray(self.tokens[i * self.seq_len:(i + 1) * self.seq_len], dtype=np.int64) for i in indices]
        return torch.from_numpy(np.stack(rows))


class SequenceOrder:
    """Visits every sequence once per epoch in an order shuffled by (seed, epoch); its position is two integers, so
    a resumed run continues exactly where the interrupted one stopped."""

    def __init__(self, n_sequences: int, seed: int, epoch: int = 0, cursor: int = 0):
        self.n = n_sequences
        self.seed = seed
        self.epoch = epoch
        self.cursor = cursor
        self._perm = self._permutation()

    def _permutation(self) -> torch.Tensor:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch))

    def take(self, count: int) -> list[int]:
        """The next `count` sequence indices, starting a new epoch when one runs out."""
        out: list[int] = []
        while len(out) < count:
            if self.cursor == self.n:
                self.epoch, self.cursor = self.epoch + 1, 0
                self._perm = self._permutation()
            step = min(count - len(out), self.n - self.cursor)
            out.extend(self._perm[self.cursor:self.cursor + step].tolist())
            self.cursor += step
        return out

    def state_dict(self) -> dict:
        """The position as JSON-able integers."""
        return {"epoch": self.epoch, "cursor": self.cursor, "n_sequences": self.n, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a position `state_dict` returned, on the same data."""
        if state["n_sequences"] != self.n:
            raise ValueError(f"the checkpoint's data position is over {state['n_sequences']} sequences but this "
                             f"data has {self.n}: resume with the same --data and seq_len")
        self.seed, self.epoch, self.cursor = state["seed"], state["epoch"], state["cursor"]
        self._perm = self._permutation()
