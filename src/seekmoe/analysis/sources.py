"""Held-out text for `seekmoe analyze`: each --data path is one source (a domain, a language), its documents tokenized
as training packs them (begin-of-text, text, end-of-text, concatenated) and cut into equal sequences. A `.jsonl` file
whose records hold `input_ids` (lists of token ids) is a token stream read as it is, for data the tokenizer cannot
write: a vision-language model's sequences with their image placeholder tokens in place."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import discover_corpus
from ..data.corpus import iter_jsonl


@dataclass
class Source:
    """One --data path's tokens."""

    name: str
    sequences: torch.Tensor  # [n, seq_len] long

    @property
    def tokens(self) -> int:
        """Tokens in all sequences."""
        return self.sequences.numel()

    def head(self, max_tokens: int) -> "Source":
        """The first sequences, at most `max_tokens` tokens (at least one sequence)."""
        n = max(1, max_tokens // self.sequences.shape[1])
        return Source(self.name, self.sequences[:n])


def load_sources(paths: Sequence[str], tokenizer, seq_len: int, max_tokens: int, vocab_size: int,
                 glob: str = "*") -> list[Source]:
    """Each path's documents (files, folders, JSONL or Parquet, as `seekmoe train --data` reads them) as at most
    `max_tokens` tokens cut into [n, seq_len] sequences (one shorter sequence when there are fewer than seq_len).
    `tokenizer` is the model's (inference.tokenizer.Tokenizer)."""
    if seq_len < 2:
        raise ValueError(f"--seq-len {seq_len}: expected at least 2 tokens")
    if max_tokens < 2:
        raise ValueError(f"--max-tokens {max_tokens}: expected at least 2")
    if not paths:
        raise ValueError("no --data path given: expected one or more files or folders of held-out text")
    sources = []
    for path in paths:
        ids: list[int] = []
        if _is_token_stream(Path(path)):
            ids = _read_token_stream(Path(path), max_tokens, vocab_size)
        for doc in [] if ids else discover_corpus([path], glob).documents():
            if not doc:
                continue
            ids += tokenizer.encode(doc, add_bos=True)
            if tokenizer.eos_token_id is not None:
                ids.append(tokenizer.eos_token_id)
            if len(ids) >= max_tokens:
                break
        ids = ids[:max_tokens]
        if len(ids) < 2:
            raise ValueError(f"--data {path}: fewer than 2 tokens of text")
        if max(ids) >= vocab_size:
            raise ValueError(f"--data {path}: token id {max(ids)} is outside the model's vocab_size={vocab_size}: "
                             f"is tokenizer.json the model's own?")
        n = len(ids) // seq_len
        seqs = torch.tensor(ids[:n * seq_len]).view(n, seq_len) if n else torch.tensor(ids)[None]
        sources.append(Source(str(path), seqs))
    return sources


def batches(sources: Sequence[Source], batch_size: int) -> list[tuple[int, torch.Tensor]]:
    """(source index, ids [<= batch_size, seq_len]) for every batch of every source, in order."""
    return [(d, s.sequences[i:i + batch_size]) for d, s in enumerate(sources)
            for i in range(0, len(s.sequences), batch_size)]


def _is_token_stream(path: Path) -> bool:
    """Whether `path` is a JSONL file whose first record has an `input_ids` field."""
    if path.suffix.lower() != ".jsonl" or not path.is_file():
        return False
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                try:
                    record = json.loads(line)
                except (json.JSONDecodeError, RecursionError):
                    return False  # the text reader names the bad line
                return isinstance(record, dict) and "input_ids" in record
    return False


def _read_token_stream(path: Path, max_tokens: int, vocab_size: int) -> list[int]:
    """The `input_ids` of every record of `path`, concatenated, at most `max_tokens` of them."""
    ids: list[int] = []
    for n, record in iter_jsonl(path):
        row = record.get("input_ids") if isinstance(record, dict) else None
        if (not isinstance(row, list)
                or any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size for t in row)):
            raise ValueError(f"{path}:{n}: expected an object whose 'input_ids' is a list of token ids in "
                             f"[0, vocab_size={vocab_size})")
        ids += row
        if len(ids) >= max_tokens:
            break
    return ids[:max_tokens]
