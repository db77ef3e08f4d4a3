"""The run's data as the training loop consumes it: the tokenizer, packed train and validation sequences, and a
resumable shuffled order, each optimizer step's global batch sliced among the data-parallel ranks."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer

from ..data import Corpus, PackedSequences, SequenceOrder, default_corpus, discover_corpus, prepare_data
from .config import TrainConfig


def select_corpus(data: list[str] | None, config: TrainConfig) -> Corpus:
    """`--data` paths (or the default corpus), without files smaller than `config.min_file_bytes`."""
    corpus = discover_corpus(data, config.data_glob) if data else default_corpus()
    if config.min_file_bytes <= 0:
        return corpus
    files = tuple(f for f in corpus.files if Path(f).stat().st_size >= config.min_file_bytes)
    if not files:
        raise ValueError(f"no file of {corpus.name} has min_file_bytes={config.min_file_bytes} bytes or more: "
                         f"lower min_file_bytes or add longer documents")
    return Corpus(files, f"{corpus.name}, files of >= {config.min_file_bytes} bytes", corpus.skipped)


class TrainData:
    """Tokenized train/validation sequences of `config.seq_len` tokens and the order they are visited in.

    Every optimizer step consumes one global batch of batch_size x grad_accum x dp_size sequences from the shared
    order; data-parallel rank r gets micro-batches r, r + dp_size, ... of it. The position in the order counts global
    sequences, so a run resumed with another number of processes continues from the same place in the data.
    """

    def __init__(self, corpus: Corpus, vocab_size: int, config: TrainConfig, tokenizer: Tokenizer | None = None,
                 dp_rank: int = 0, dp_size: int = 1, progress: bool = True):
        self.config = config
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.tokenized = prepare_data(corpus, vocab_size, config.val_fraction, config.cache_dir, tokenizer,
                                      progress=progress)
        self.tokenizer = self.tokenized.tokenizer
        if self.tokenizer.get_vocab_size() > vocab_size:
            raise ValueError(f"the tokenizer has {self.tokenizer.get_vocab_size()} tokens but vocab_size="
                             f"{vocab_size}: set vocab_size to at least that")
        self.train = PackedSequences(self.tokenized.train_tokens, config.seq_len, "train")
        self.val = (PackedSequences(self.tokenized.val_tokens, config.seq_len, "validation")
                    if len(self.tokenized.val_tokens) >= config.seq_len else None)
        self.order = SequenceOrder(len(self.train), config.seed)

    @property
    def tokens_per_step(self) -> int:
        """Tokens of one global batch, over every rank."""
        c = self.config
        return c.batch_size * c.grad_accum * self.dp_size * c.seq_len

    def next_micro_batches(self) -> list[torch.Tensor]:
        """This rank's `grad_accum` micro-batches [batch_size, seq_len] of the next global batch."""
        c = self.config
        ids = self.order.take(c.batch_size * c.grad_accum * self.dp_size)
        return [self.train.batch(ids[(m * self.dp_size + self.dp_rank) * c.batch_size:][:c.batch_size])
                for m in range(c.grad_accum)]

    def val_batches(self) -> list[tuple[torch.Tensor, bool]]:
        """This rank's share of the validation batches, as (batch, counts) pairs. Every rank gets the same number
        of batches (collectives in the forward need all ranks), the padding ones marked counts=False."""
        if self.val is None:
            return []
        c = self.config
        n = min(len(self.val), c.eval_batches * c.batch_size)
        starts = list(range(0, n, c.batch_size))
        per_rank = -(-len(starts) // self.dp_size)
        mine = starts[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]
        out = [(self.val.batch(range(s, min(s + c.batch_size, n))), True) for s in mine]
        while len(out) < per_rank:
            out.append((self.val.batch(range(0, min(c.batch_size, n))), False))
        return out

    def state_dict(self) -> dict:
        """The position in the data (global, independent of the number of ranks)."""
        return self.order.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Continue from a position `state_dict` returned."""
        self.order.load_state_dict(state)
