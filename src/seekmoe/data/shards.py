"""Tokenize a corpus once into memory-mapped token shards, cached under a key of corpus + tokenizer.

Layout of one cache entry, `CACHE/tokens/KEY/`: `train.bin` and `val.bin` (the token ids of each split's documents,
each document followed by EOS, as uint16 or uint32) and `meta.json`. Validation documents are chosen by a hash of
their text, so the split is the same on every machine and for every run. Tokenizers are cached the same way under
`CACHE/tokenizers/KEY/tokenizer.json`. CACHE is `$SEEKMOE_CACHE`, else `~/.cache/seekmoe`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from .corpus import Corpus
from .tokenizer import BOS_TOKEN, EOS_TOKEN, train_tokenizer

# Bump when the tokenizer recipe or the shard layout changes: old cache entries are then unused.
# 2: each document is <|begin_of_text|> ... <|end_of_text|>, so training sees what inference prompts start with.
FORMAT_VERSION = 2
_ENCODE_BATCH = 64  # documents per encode_batch call


@dataclass
class TokenizedCorpus:
    """A corpus's tokenizer and its train/validation token streams (memory-mapped), with how long each phase took."""

    tokenizer: Tokenizer
    train_tokens: np.ndarray  # [N] memmap
    val_tokens: np.ndarray  # [M] memmap (possibly empty)
    meta: dict  # documents, tokens and bytes per split, the cache key, seconds per phase (0 when cached)


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Where tokenizers and token shards are cached."""
    return Path(cache_dir or os.environ.get("SEEKMOE_CACHE") or Path.home() / ".cache" / "seekmoe").expanduser()


def prepare_data(corpus: Corpus, vocab_size: int, val_fraction: float = 0.02, cache_dir: str | Path | None = None,
                 tokenizer: Tokenizer | None = None, progress: bool = True) -> TokenizedCorpus:
    """Train (or reuse) a tokenizer for `corpus` and tokenize it (or reuse its shards) into train and validation.

    `tokenizer`, when given, is used instead of training one (a resumed run passes its checkpoint's).
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction!r} is invalid: expected a number in [0, 1)")
    root = cache_root(cache_dir)
    corpus_key = corpus.fingerprint()
    timings = {"tokenizer_s": 0.0, "tokenize_s": 0.0}
    if tokenizer is None:
        tok_dir = root / "tokenizers" / _key(corpus_key, vocab_size, FORMAT_VERSION)
        if not (tok_dir / "tokenizer.json").is_file():
            start = time.perf_counter()
            if progress:
                print(f"training a {vocab_size}-token byte-level BPE tokenizer on {corpus.name} "
                      f"({len(corpus.files)} files, {corpus.total_bytes / 1e6:.1f} MB)", flush=True)
            trained = train_tokenizer(_nonempty(corpus), vocab_size)
            _publish(tok_dir, lambda tmp: trained.save(str(tmp / "tokenizer.json")))
            timings["tokenizer_s"] = time.perf_counter() - start
        tokenizer = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    tok_json = tokenizer.to_str()
    shard_dir = root / "tokens" / _key(corpus_key, hashlib.sha256(tok_json.encode()).hexdigest(), val_fraction,
                                       FORMAT_VERSION)
    if not (shard_dir / "meta.json").is_file():
        start = time.perf_counter()
        _publish(shard_dir, lambda tmp: _tokenize_into(tmp, corpus, tokenizer, val_fraction, progress))
        timings["tokenize_s"] = time.perf_counter() - start
    meta = json.loads((shard_dir / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    splits = {name: (np.memmap(shard_dir / f"{name}.bin", dtype=dtype, mode="r") if meta[name]["tokens"]
                     else np.zeros(0, dtype)) for name in ("train", "val")}
    return TokenizedCorpus(tokenizer, splits["train"], splits["val"],
                           {**meta, "cache_dir": str(shard_dir), **timings})


def _key(*parts) -> str:
    return hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()[:20]


def _nonempty(corpus: Corpus):
    n = 0
    for doc in corpus.documents():
        if doc.strip():
            n += 1
            yield doc
    if n == 0:
        raise ValueError(f"the corpus {corpus.name} is empty: its {len(corpus.files)} file(s) hold no text")


def _publish(final: Path, write) -> None:
    """Run write(tmp_dir) and rename tmp_dir to `final`, so a cache entry is either complete or absent."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        os.replace(tmp, final) if not final.exists() else shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _validation_draw(text: str) -> float:
    """A number in [0, 1) fixed by the document's text; documents under val_fraction are held out."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8).digest(), "big") / 2**64


def _tokenize_into(out: Path, corpus: Corpus, tokenizer: Tokenizer, val_fraction: float, progress: bool) -> None:
    """Write train.bin, val.bin and meta.json for `corpus` into `out`."""
    draws = [_validation_draw(doc) for doc in _nonempty(corpus)]
    held_out = {i for i, d in enumerate(draws) if d < val_fraction}
    if val_fraction > 0 and not held_out:  # a small corpus: hold out its lowest-drawn document
        if len(draws) < 2:
            raise ValueError(f"the corpus {corpus.name} has {len(draws)} document; a validation split needs at "
                             f"least 2 (or set val_fraction=0)")
        held_out = {int(np.argmin(draws))}
    if len(held_out) == len(draws):
        raise ValueError(f"val_fraction={val_fraction} holds out all {len(draws)} documents of {corpus.name}")
    vocab = tokenizer.get_vocab_size()
    dtype = np.dtype(np.uint16 if vocab <= 2**16 else np.uint32)
    bos, eos = tokenizer.token_to_id(BOS_TOKEN), tokenizer.token_to_id(EOS_TOKEN)
    if bos is None or eos is None:
        raise ValueError(f"the tokenizer lacks {BOS_TOKEN} or {EOS_TOKEN}: expected both, to mark each document's "
                         f"start and end")
    stats = {name: {"documents": 0, "tokens": 0, "bytes": 0} for name in ("train", "val")}
    files = {name: open(out / f"{name}.bin", "wb") for name in stats}
    bar = tqdm(total=len(draws), desc="tokenizing", unit="doc", disable=not progress, dynamic_ncols=True)
    try:
        batch: list[str] = []
        index = 0

        def flush() -> None:
            nonlocal index
            for doc, enc in zip(batch, tokenizer.encode_batch(batch, add_special_tokens=False)):
                name = "val" if index in held_out else "train"
                ids = np.asarray([bos] + enc.ids + [eos], dtype=dtype)
                ids.tofile(files[name])
                stats[name]["documents"] += 1
                stats[name]["tokens"] += len(ids)
                stats[name]["bytes"] += len(doc.encode("utf-8", "replace"))
                index += 1
            bar.update(len(batch))
            bar.set_postfix(tokens=stats["train"]["tokens"] + stats["val"]["tokens"])
            batch.clear()

        for doc in _nonempty(corpus):
            batch.append(doc)
            if len(batch) == _ENCODE_BATCH:
                flush()
        flush()
    finally:
        bar.close()
        for f in files.values():
            f.close()
    meta = {"format_version": FORMAT_VERSION, "corpus": corpus.name, "files": len(corpus.files),
            "vocab_size": vocab, "dtype": dtype.name, "val_fraction": val_fraction, **stats}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
