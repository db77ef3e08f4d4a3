"""Tokenize a corpus once into memory-mapped token shards, cached under a key of corpus + tokenizer.

Layout of one cache entry, `CACHE/tokens/KEY/`: `train.bin` and `val.bin` (the token ids of each split's documents,
each document between BOS and EOS, as uint16 or uint32) and `meta.json`. It is written in bounded memory and
resumably in `CACHE/tokens/.partial-KEY/` (see tokenizing.py), renamed to KEY when complete. Validation documents
are chosen by a hash of their text, so the split is the same on every machine and for every run. Tokenizers are
cached the same way under `CACHE/tokenizers/KEY/tokenizer.json`. CACHE is `$SEEKMOE_CACHE`, else
`~/.cache/seekmoe`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from .corpus import Corpus
from .tokenizer import train_tokenizer
from .tokenizing import nonempty_pieces, tokenize_corpus

# Bump when the tokenizer recipe or the shard layout changes: old cache entries are then unused.
# 2: each document is <|begin_of_text|> ... <|end_of_text|>, so training sees what inference prompts start with.
# 3: a text file over 16 Mi characters is one document (it was several), read in pieces (issue 26).
FORMAT_VERSION = 3


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

    `tokenizer`, when given, is used instead of training one (a resumed run passes its checkpoint's). Both steps
    read the corpus in pieces, so memory does not grow with the size of a file; tokenizing uses every core and,
    killed, carries on where it stopped when called again.
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
            trained = train_tokenizer(nonempty_pieces(corpus), vocab_size)
            _publish(tok_dir, lambda tmp: trained.save(str(tmp / "tokenizer.json")))
            timings["tokenizer_s"] = time.perf_counter() - start
        tokenizer = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    tok_json = tokenizer.to_str()
    shard_dir = root / "tokens" / _key(corpus_key, hashlib.sha256(tok_json.encode()).hexdigest(), val_fraction,
                                       FORMAT_VERSION)
    if not (shard_dir / "meta.json").is_file():
        start = time.perf_counter()
        _tokenize_resumably(shard_dir, corpus, tokenizer, val_fraction, progress)
        timings["tokenize_s"] = time.perf_counter() - start
    meta = json.loads((shard_dir / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    splits = {name: (np.memmap(shard_dir / f"{name}.bin", dtype=dtype, mode="r") if meta[name]["tokens"]
                     else np.zeros(0, dtype)) for name in ("train", "val")}
    return TokenizedCorpus(tokenizer, splits["train"], splits["val"],
                           {**meta, "cache_dir": str(shard_dir), **timings})


def _key(*parts) -> str:
    return hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()[:20]


def _publish(final: Path, write) -> None:
    """Run write(tmp_dir) and rename tmp_dir to `final`, so a cache entry is either complete or absent."""
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".tmp-{final.name}-*"):  # left by a killed run
        if not _pid_alive(stale.name.rsplit("-", 1)[-1]):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        os.replace(tmp, final) if not final.exists() else shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _pid_alive(pid: str) -> bool:
    """Whether process `pid` (a string from a folder name) is running on this machine; True when unsure."""
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except OSError:  # PermissionError: someone else's live process
        return True
    return True


def _tokenize_resumably(final: Path, corpus: Corpus, tokenizer: Tokenizer, val_fraction: float,
                        progress: bool) -> None:
    """Tokenize into `.partial-KEY` (kept after a kill, so a rerun carries on) and rename it to `final`."""
    work = final.parent / f".partial-{final.name}"
    with _locked(final.parent / f".lock-{final.name}"):  # two runs on one cache: the second waits, then reuses
        if (final / "meta.json").is_file():
            return
        meta = tokenize_corpus(work, corpus, tokenizer, val_fraction, progress)
        (work / "meta.json").write_text(json.dumps({"format_version": FORMAT_VERSION, **meta}, indent=2) + "\n")
        for name in ("plan.json", "progress.json"):
            (work / name).unlink(missing_ok=True)
        shutil.rmtree(final, ignore_errors=True)  # a folder without meta.json is no cache entry
        os.replace(work, final)


@contextmanager
def _locked(path: Path):
    """An exclusive lock on `path` (created) while the block runs; nothing where fcntl is missing."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
