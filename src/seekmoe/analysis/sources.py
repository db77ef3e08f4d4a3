"""Held-out text for `seekmoe analyze`: each --data path is one source (a domain, a language), its documents tokenized
as training packs them (begin-of-text, text, end-of-text, concatenated) and cut into equal sequences. A `.jsonl` file
whose records hold `input_ids` (lists of token ids) is a token stream read as it is, for data the tokenizer cannot
write: a vision-language model's sequences with their image placeholder tokens in place. Given a vision-language
model, a `.jsonl` file of chats (`messages`, user turns holding OpenAI-style image and text parts, as `seekmoe sft`
reads them) is an `ImageChats` source: each chat one sequence, its pictures going in through the model's embedding
path (`pixel_values`, `image_grid_thw`) in place of its image placeholder tokens."""

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

    @property
    def shape(self) -> tuple[int, int]:
        """(sequences, tokens per sequence)."""
        return int(self.sequences.shape[0]), int(self.sequences.shape[1])

    def head(self, max_tokens: int) -> "Source":
        """The first sequences, at most `max_tokens` tokens (at least one sequence)."""
        n = max(1, max_tokens // self.sequences.shape[1])
        return Source(self.name, self.sequences[:n])

    def batches(self, batch_size: int) -> list[tuple[torch.Tensor, dict]]:
        """(ids [<= batch_size, seq_len], no extra model inputs) for every batch, in order."""
        return [(self.sequences[i:i + batch_size], {}) for i in range(0, len(self.sequences), batch_size)]


@dataclass
class ImageChats:
    """A vision-language model's held-out chats: one sequence per chat (ids with the image placeholders in place)
    and its pictures as the model's image processor makes them (None for a chat without pictures)."""

    name: str
    rows: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]  # (ids [L], pixel_values, grid_thw)

    @property
    def tokens(self) -> int:
        """Tokens in all sequences (image placeholders included)."""
        return sum(len(ids) for ids, _, _ in self.rows)

    @property
    def shape(self) -> tuple[int, int]:
        """(sequences, tokens of the longest)."""
        return len(self.rows), max(len(ids) for ids, _, _ in self.rows)

    def head(self, max_tokens: int) -> "ImageChats":
        """The first chats, at most `max_tokens` tokens (at least one chat)."""
        n, total = 0, 0
        while n < len(self.rows) and (n == 0 or total + len(self.rows[n][0]) <= max_tokens):
            total += len(self.rows[n][0])
            n += 1
        return ImageChats(self.name, self.rows[:n])

    def batches(self, batch_size: int) -> list[tuple[torch.Tensor, dict]]:
        """(ids [<= batch_size, L], {pixel_values, image_grid_thw}) of chats of equal length L batched together
        (no padding, which the routers would see), shortest first."""
        by_length: dict[int, list[int]] = {}
        for i, (ids, _, _) in enumerate(self.rows):
            by_length.setdefault(len(ids), []).append(i)
        out = []
        for length in sorted(by_length):
            group = by_length[length]
            for start in range(0, len(group), batch_size):
                chunk = [self.rows[i] for i in group[start:start + batch_size]]
                pictures = [(p, g) for _, p, g in chunk if p is not None]
                inputs = {} if not pictures else {"pixel_values": torch.cat([p for p, _ in pictures]),
                                                  "image_grid_thw": torch.cat([g for _, g in pictures])}
                out.append((torch.stack([ids for ids, _, _ in chunk]), inputs))
        return out


def load_image_chats(path: str | Path, tokenizer, config, max_tokens: int) -> ImageChats:
    """The chats of the JSONL file `path` rendered for the vision-language model of `config` (prompt and answers,
    pictures preprocessed by `config.image_processor()`, the model's own; file:// pictures read only under the
    file's folder), at most `max_tokens` tokens (at least one chat)."""
    from ..posttrain.sft_data import read_jsonl
    from ..vision.sft import render_vision_example

    processor = config.image_processor()
    rows, total = [], 0
    for n, record in enumerate(read_jsonl(path), start=1):
        try:
            e = render_vision_example(record, tokenizer, config, processor, Path(path).resolve().parent)
        except ValueError as err:
            raise ValueError(f"--data {path}:{n}: {err}") from None
        if rows and total + len(e.ids) > max_tokens:
            break
        rows.append((torch.tensor(e.ids), e.pixel_values, e.image_grid_thw))
        total += len(e.ids)
    if not rows:
        raise ValueError(f"--data {path}: no chat to analyze")
    return ImageChats(str(path), rows)


def load_sources(paths: Sequence[str], tokenizer, seq_len: int, max_tokens: int, vocab_size: int,
                 glob: str = "*", vision_config=None) -> list[Source | ImageChats]:
    """Each path's documents (files, folders, JSONL or Parquet, as `seekmoe train --data` reads them) as at most
    `max_tokens` tokens cut into [n, seq_len] sequences (one shorter sequence when there are fewer than seq_len).
    `tokenizer` is the model's (inference.tokenizer.Tokenizer). With `vision_config` (a vision-language model's
    VisionLanguageConfig), a JSONL file of chats is read as ImageChats."""
    if seq_len < 2:
        raise ValueError(f"--seq-len {seq_len}: expected at least 2 tokens")
    if max_tokens < 2:
        raise ValueError(f"--max-tokens {max_tokens}: expected at least 2")
    if not paths:
        raise ValueError("no --data path given: expected one or more files or folders of held-out text")
    sources = []
    for path in paths:
        if vision_config is not None and _has_field(Path(path), "messages"):
            sources.append(load_image_chats(path, tokenizer, vision_config, max_tokens))
            continue
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


def batches(sources: Sequence[Source | ImageChats], batch_size: int) -> list[tuple[int, torch.Tensor, dict]]:
    """(source index, ids [<= batch_size, L], extra model inputs: a vision-language model's pictures) for every
    batch of every source, in order."""
    return [(d, ids, inputs) for d, s in enumerate(sources) for ids, inputs in s.batches(batch_size)]


def _is_token_stream(path: Path) -> bool:
    """Whether `path` is a JSONL file whose first record has an `input_ids` field."""
    return _has_field(path, "input_ids")


def _has_field(path: Path, name: str) -> bool:
    """Whether `path` is a JSONL file whose first record has the field `name`."""
    if path.suffix.lower() != ".jsonl" or not path.is_file():
        return False
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                try:
                    record = json.loads(line)
                except (json.JSONDecodeError, RecursionError):
                    return False  # the text reader names the bad line
                return isinstance(record, dict) and name in record
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
