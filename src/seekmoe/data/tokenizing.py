"""Tokenizing a corpus into train/validation token files in bounded memory, on every core, resumably (issue 26).

Documents are read in pieces of at most `PIECE_CHARS` characters cut between pre-tokens (`Corpus.pieces`), so the
ids are exactly those of whole documents. A batch of a few pieces per core goes to one `encode_batch` call (the
Rust thread pool of `tokenizers` spreads it over every core and releases the GIL), while this thread writes out the
batch before it: memory is a few batches of pieces whatever the size of a file, and every core is busy.

The work folder survives a kill. `plan.json` holds the split (which documents are held out for validation, found
in a first pass that hashes each document as it streams by); `train.bin` and `val.bin` grow as pieces are encoded,
and `progress.json`, rewritten atomically every `COMMIT_CHARS` characters after the token files are synced, says
how many pieces they hold. A rerun truncates them to that and carries on; `meta.json` is written last.
"""

from __future__ import annotations

import hashlib
import json
import os
from array import array
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from ..progress import show_progress
from .corpus import PIECE_CHARS, Corpus
from .tokenizer import BOS_TOKEN, EOS_TOKEN

COMMIT_CHARS = 64 * 1024 * 1024  # characters encoded between two progress records (a kill loses at most these)
_SPLITS = ("train", "val")


def encode_threads() -> int:
    """The cores this process may run on: what `tokenizers`' thread pool uses, and what a batch is sized by."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def nonempty_pieces(corpus: Corpus, piece_chars: int = PIECE_CHARS) -> Iterator[str]:
    """The pieces of every document that is not all whitespace (what a tokenizer is trained on). Raises
    ValueError when there is none."""
    found = False
    held: list[str] = []  # leading whitespace-only pieces of the current document, until it shows some text
    seen_text = False
    for piece, last in corpus.pieces(piece_chars):
        if seen_text or piece.strip():
            found = seen_text = True
            yield from held
            held.clear()
            yield piece
        elif len(held) < 16:  # more leading whitespace than 16 pieces is dropped (the counts hardly change)
            held.append(piece)
        if last:
            held.clear()
            seen_text = False
    if not found:
        raise ValueError(f"the corpus {corpus.name} is empty: its {len(corpus.files)} file(s) hold no text")


def plan_split(corpus: Corpus, val_fraction: float, piece_chars: int = PIECE_CHARS, progress: bool = False) -> dict:
    """The first pass: documents that are all whitespace (skipped), documents held out for validation (those whose
    text hashes under val_fraction; at least one when val_fraction > 0), and the bytes to tokenize. Document
    numbers count every document of `corpus.pieces` in order."""
    draws, numbers = array("d"), array("q")  # of non-empty documents: 16 bytes each, millions fit
    empty: list[int] = []
    text_bytes = 0
    digest, size, has_text, doc = hashlib.blake2b(digest_size=8), 0, False, 0
    bar = _byte_progress(corpus.total_bytes, "scanning", progress)  # on disk: about the text of text files
    try:
        for piece, last in corpus.pieces(piece_chars):
            data = piece.encode("utf-8", "replace")
            digest.update(data)
            size += len(data)
            has_text = has_text or bool(piece.strip())
            bar.update(len(data))
            if last:
                if has_text:
                    draws.append(int.from_bytes(digest.digest(), "big") / 2**64)
                    numbers.append(doc)
                    text_bytes += size
                else:
                    empty.append(doc)
                digest, size, has_text, doc = hashlib.blake2b(digest_size=8), 0, False, doc + 1
    finally:
        bar.close()
    if not draws:
        raise ValueError(f"the corpus {corpus.name} is empty: its {len(corpus.files)} file(s) hold no text")
    d = np.frombuffer(draws, dtype=np.float64)
    held = np.flatnonzero(d < val_fraction)
    if val_fraction > 0 and not len(held):  # a small corpus: hold out its lowest-drawn document
        if len(d) < 2:
            raise ValueError(f"the corpus {corpus.name} has {len(d)} document; a validation split needs at least 2 "
                             f"(or set val_fraction=0)")
        held = np.array([int(np.argmin(d))])
    if len(held) == len(d):
        raise ValueError(f"val_fraction={val_fraction} holds out all {len(d)} documents of {corpus.name}")
    return {"piece_chars": piece_chars, "val_fraction": val_fraction, "documents": doc, "empty": empty,
            "held_out": [int(numbers[i]) for i in held], "text_bytes": text_bytes}


def tokenize_corpus(out: str | Path, corpus: Corpus, tokenizer: Tokenizer, val_fraction: float,
                    progress: bool = True, piece_chars: int = PIECE_CHARS, commit_chars: int | None = None,
                    batch_pieces: int | None = None) -> dict:
    """Write train.bin and val.bin (each document as BOS, its ids, EOS; uint16 or uint32) for `corpus` into the
    folder `out`, carrying on from what a killed run left there. Returns what meta.json should say of them."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # A document that spells "<|end_of_text|>" (this library's own source, a chat log) holds text, not a document
    # boundary: special tokens enter only as the BOS and EOS written around each document (a copy: the caller's
    # tokenizer is left as it was).
    tokenizer = Tokenizer.from_str(tokenizer.to_str())
    tokenizer.encode_special_tokens = True
    vocab = tokenizer.get_vocab_size()
    dtype = np.dtype(np.uint16 if vocab <= 2**16 else np.uint32)
    bos, eos = tokenizer.token_to_id(BOS_TOKEN), tokenizer.token_to_id(EOS_TOKEN)
    if bos is None or eos is None:
        raise ValueError(f"the tokenizer lacks {BOS_TOKEN} or {EOS_TOKEN}: expected both, to mark each document's "
                         f"start and end")
    plan = _read_json(out / "plan.json")
    if not plan or plan.get("piece_chars") != piece_chars or plan.get("val_fraction") != val_fraction:
        plan = plan_split(corpus, val_fraction, piece_chars, progress)
        _write_json(out / "plan.json", plan)
        (out / "progress.json").unlink(missing_ok=True)
    done = _read_json(out / "progress.json") or {"pieces": 0, "bytes": 0, **{
        name: {"documents": 0, "tokens": 0, "bytes": 0} for name in _SPLITS}}
    for name in _SPLITS:  # drop whatever a killed run wrote after its last progress record
        path = out / f"{name}.bin"
        path.touch()
        os.truncate(path, done[name]["tokens"] * dtype.itemsize)
    writer = _Writer(out, done, dtype, bos, eos)
    batch_pieces = batch_pieces or 2 * encode_threads()
    commit_chars = commit_chars or COMMIT_CHARS
    bar = _byte_progress(plan["text_bytes"], "tokenizing", progress, initial=done["bytes"])
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = None
            since_commit = 0
            for batch in _batches(corpus, plan, done["pieces"], piece_chars, batch_pieces):
                future = pool.submit(_encode, tokenizer, [p[0] for p in batch], dtype)
                if pending is not None:  # write the previous batch while this one encodes
                    since_commit += writer.write(*pending, bar)
                pending = (batch, future)
                if since_commit >= commit_chars:
                    writer.commit()
                    since_commit = 0
            if pending is not None:
                writer.write(*pending, bar)
            writer.commit()
    finally:
        bar.close()
        writer.close()
    return {"corpus": corpus.name, "files": len(corpus.files), "vocab_size": vocab, "dtype": dtype.name,
            "val_fraction": val_fraction, **{name: done[name] for name in _SPLITS}}


def _byte_progress(total: int | None, desc: str, enabled: bool, initial: int = 0):
    """A progress display counting bytes of text, so it moves inside one huge document too."""
    bar = show_progress(total, desc, unit="B", enabled=enabled, initial=initial)
    if hasattr(bar, "unit_scale"):  # a tqdm bar on a terminal: 1.2MiB, not 1258291
        bar.unit_scale, bar.unit_divisor = True, 1024
    return bar


def _batches(corpus: Corpus, plan: dict, skip: int, piece_chars: int, size: int) -> Iterator[list[tuple]]:
    """Lists of at most `size` pieces to encode, each (text, split, first, last, piece number), past the first
    `skip` pieces; the pieces of empty documents are left out."""
    empty, held = set(plan["empty"]), set(plan["held_out"])
    batch: list[tuple] = []
    doc, first = 0, True
    for n, (piece, last) in enumerate(corpus.pieces(piece_chars)):
        if n >= skip and doc not in empty:
            batch.append((piece, "val" if doc in held else "train", first, last, n))
            if len(batch) == size:
                yield batch
                batch = []
        first = last
        doc += last
    if batch:
        yield batch


def _encode(tokenizer: Tokenizer, texts: list[str], dtype: np.dtype) -> list[np.ndarray]:
    """The ids of each text; the conversion happens here so that the Encoding objects die with the call."""
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # no offsets: less memory (>= 0.21)
    return [np.asarray(e.ids, dtype=dtype) for e in encode(texts, add_special_tokens=False)]


class _Writer:
    """Appends encoded pieces to the split files and records progress."""

    def __init__(self, out: Path, done: dict, dtype: np.dtype, bos: int, eos: int):
        self.out, self.done, self.dtype = out, done, dtype
        self.bos, self.eos = np.array([bos], dtype), np.array([eos], dtype)
        self.files = {name: open(out / f"{name}.bin", "ab") for name in _SPLITS}
        self.pieces = done["pieces"]

    def write(self, batch: list[tuple], future, bar) -> int:
        """Write one encoded batch; returns its characters."""
        chars = 0
        for (text, name, first, last, n), ids in zip(batch, future.result()):
            parts = ([self.bos] if first else []) + [ids] + ([self.eos] if last else [])
            for part in parts:
                self.files[name].write(part)  # the array's bytes, through the file's buffer
            stats = self.done[name]
            stats["tokens"] += sum(len(p) for p in parts)
            nbytes = len(text.encode("utf-8", "replace"))
            stats["bytes"] += nbytes
            stats["documents"] += last
            self.done["bytes"] += nbytes
            self.pieces = n + 1
            chars += len(text)
            bar.update(nbytes)
        return chars

    def commit(self) -> None:
        """Make what is written durable, then record it: a kill after this loses nothing before it."""
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
        self.done["pieces"] = self.pieces
        _write_json(self.out / "progress.json", self.done)

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _write_json(path: Path, value: dict) -> None:
    """Write `path` whole or not at all (a temporary file renamed over it)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value) + "\n")
    os.replace(tmp, path)
