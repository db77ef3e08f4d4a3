"""Corpus discovery: which documents a training run reads, and a fingerprint that names them for caching.

A document is one text file, one JSONL line's `text` field, or one Parquet row's `text` column. The default corpus
is the Python standard library's own source (no download): every `*.py` under the `sysconfig` stdlib path, test
folders and installed packages excluded.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

# Folders left out of the default corpus: the stdlib's own test suites and whatever is installed next to it.
_CHUNK_CHARS = 16 * 1024 * 1024  # a text file larger than this becomes several documents
_DEFAULT_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


@dataclass(frozen=True)
class Corpus:
    """An ordered list of source files and a short name for progress messages."""

    files: tuple[Path, ...]
    name: str
    skipped: int = 0  # files of a --data folder left out because they are not text

    def documents(self) -> Iterator[str]:
        """Every document's text, file by file, in a fixed order."""
        for path in self.files:
            yield from _read_documents(path)

    def fingerprint(self) -> str:
        """A hex digest of every file's path, size and modification time: equal digests mean the same corpus."""
        h = hashlib.sha256()
        for path in self.files:
            st = path.stat()
            h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    @property
    def total_bytes(self) -> int:
        """Size of the corpus files on disk."""
        return sum(p.stat().st_size for p in self.files)


def default_corpus() -> Corpus:
    """The Python standard library's `*.py` files (test folders and site-packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in sorted(root.rglob("*.py"))
             if not any(part in _DEFAULT_EXCLUDED_DIRS for part in p.relative_to(root).parts[:-1])]
    if not files:
        raise ValueError(f"the default corpus is empty: no *.py files under the stdlib path {root}; pass --data PATH")
    return Corpus(tuple(files), f"Python standard library ({root})")


def discover_corpus(paths: Sequence[str | Path], glob: str = "*") -> Corpus:
    """The files named by `paths`: text, `.jsonl` or `.parquet` files as given, and folders searched recursively
    for files matching `glob` (hidden files and folders skipped). Raises FileNotFoundError for a missing path and
    ValueError when nothing is found."""
    files: list[Path] = []
    skipped = 0
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_file():
            files.append(path.resolve())
        elif path.is_dir():
            found = [p.resolve() for p in sorted(path.rglob(glob)) if p.is_file()
                     and not any(part.startswith(".") for part in p.relative_to(path).parts)]
            if not found:
                raise ValueError(f"--data {raw}: the folder holds no files matching {glob!r}")
            text = [p for p in found if p.suffix.lower() in (".jsonl", ".parquet") or is_text_file(p)]
            skipped += len(found) - len(text)
            if not text:
                raise ValueError(f"--data {raw}: the folder holds no text files ({len(found)} binary files)")
            files.extend(text)
        else:
            raise FileNotFoundError(f"--data {raw}: no such file or folder")
    if not files:
        raise ValueError("no data paths given: expected at least one file or folder")
    name = ", ".join(str(p) for p in paths)
    if skipped:
        name += f" ({skipped} non-text file(s) skipped)"
        print(f"--data: skipped {skipped} non-text file(s) (binary content)", flush=True)
    return Corpus(tuple(dict.fromkeys(files)), name, skipped)


def is_text_file(path: Path, probe: int = 8192) -> bool:
    """Whether a file looks like text: no NUL byte in its first `probe` bytes, and they decode as UTF-8 (a
    character cut at the end of the probe allowed)."""
    with path.open("rb") as f:
        head = f.read(probe)
    if b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start >= len(head) - 3  # only a multi-byte character cut by the probe's end
    return True


def _read_documents(path: Path) -> Iterator[str]:
    """The documents in one file, by its suffix."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open(encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n} is not valid JSON: {e}") from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise ValueError(f"{path}:{n}: expected an object with a string 'text' field")
                yield record["text"]
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"{path}: reading Parquet needs pyarrow (pip install 'seekmoe[parquet]')") from None
        table = pq.ParquetFile(path)
        if "text" not in table.schema_arrow.names:
            raise ValueError(f"{path}: expected a 'text' column, found {table.schema_arrow.names}")
        for batch in table.iter_batches(columns=["text"]):
            yield from (t for t in batch.column(0).to_pylist() if t)
    else:
        # One document per file, read whole unless it is huge: then in pieces of about _CHUNK_CHARS characters
        # ending at a line break, so memory stays bounded whatever the file's size.
        with path.open(encoding="utf-8", errors="replace") as f:
            piece: list[str] = []
            size = 0
            for line in f:
                piece.append(line)
                size += len(line)
                if size >= _CHUNK_CHARS:
                    yield "".join(piece)
                    piece, size = [], 0
            if piece or size == 0:
                yield "".join(piece)
