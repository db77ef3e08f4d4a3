"""Corpus discovery: which documents a training run reads, and a fingerprint that names them for caching.

A document is one text file, one JSONL line's `text` field, or one Parquet row's `text` column. The default corpus
is the Python standard library's own source (no download): every `*.py` under the `sysconfig` stdlib path, test
folders and installed packages excluded.

Documents can also be read in pieces of bounded size (`Corpus.pieces`), so that neither tokenizer training nor
tokenizing holds a whole file: a piece ends where a byte-level BPE pre-token ends (see `_safe_cut`), so the
pieces of a document encode to exactly the ids of the whole document.
"""

from __future__ import annotations

import hashlib
import json
import re
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

# Folders left out of the default corpus: the stdlib's own test suites and whatever is installed next to it.
_CHUNK_CHARS = 16 * 1024 * 1024  # documents(): a text file larger than this comes in several parts
# Pieces of 64 Ki characters: encoding one costs about 10 MB inside `tokenizers` (~170 bytes a character, measured),
# so a batch of a few per core stays in the tens of MB, and per-call overhead is still negligible.
PIECE_CHARS = 64 * 1024
_SURROGATE = re.compile("[\ud800-\udfff]")
_DEFAULT_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


@dataclass(frozen=True)
class Corpus:
    """An ordered list of source files and a short name for progress messages."""

    files: tuple[Path, ...]
    name: str
    skipped: int = 0  # files of a --data folder left out because they are not text

    def documents(self) -> Iterator[str]:
        """Every document's text, file by file, in a fixed order (a text file over 16 Mi characters in parts)."""
        parts: list[str] = []
        size = 0
        for piece, last in self.pieces():
            parts.append(piece)
            size += len(piece)
            if last or size >= _CHUNK_CHARS:
                yield "".join(parts)
                parts, size = [], 0

    def pieces(self, piece_chars: int = PIECE_CHARS) -> Iterator[tuple[str, bool]]:
        """Every document as pieces of at most `piece_chars` characters, each with whether it ends its document
        (an empty document is one empty piece). Pieces are cut where a pre-token ends, so encoding them one by one
        gives the ids of the whole document; only a stretch of `piece_chars` without whitespace is cut blindly."""
        for path in self.files:
            for text in _read_documents(path, piece_chars):
                yield from _with_last(split_pieces(text, piece_chars))

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


def split_pieces(chunks: Iterable[str], piece_chars: int) -> Iterator[str]:
    """The text of `chunks` (joined) in pieces of at most `piece_chars` characters, cut by `_safe_cut`; at least
    one piece, empty for an empty text."""
    if piece_chars < 2:
        raise ValueError(f"piece_chars={piece_chars} is invalid: expected at least 2 characters")
    buf = ""
    for chunk in chunks:
        buf = buf + chunk if buf else chunk
        start = 0
        while len(buf) - start > piece_chars:  # slices from `start`: a huge chunk is not copied once per piece
            cut = _safe_cut(buf, start, start + piece_chars)
            yield buf[start:cut]
            start = cut
        buf = buf[start:]
    yield buf


# A piece ends before one of these when the character before it is not whitespace. In the byte-level pre-tokenizer
# (GPT-2's pattern: `'s|'t|... | ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`) no pre-token runs from a
# non-space character into whitespace, and what follows starts afresh either way, so the cut is between
# pre-tokens and changes no id. (Cutting after whitespace would not be: "  \n" alone is one pre-token, before a
# word it is two.)
_CUT_BEFORE = (" ", "\n", "\t", "\r")


def _safe_cut(text: str, start: int, end: int) -> int:
    """The largest i in (start, end] with text[i] a space, newline, tab or CR and text[i-1] not whitespace; `end`
    when there is none (text without whitespace for a whole piece). Needs end < len(text)."""
    found = {c: text.rfind(c, start + 1, end + 1) for c in _CUT_BEFORE}
    while True:
        c = max(found, key=found.__getitem__)
        i = found[c]
        if i < 0:
            return end
        if not text[i - 1].isspace():
            return i
        found[c] = text.rfind(c, start + 1, i)  # inside a run of whitespace: look further back


def _with_last(items: Iterator[str]) -> Iterator[tuple[str, bool]]:
    """Each item with whether it is the last."""
    previous = next(items)
    for item in items:
        yield previous, False
        previous = item
    yield previous, True


def _without_lone_surrogates(text: str) -> str:
    """`text` with each lone surrogate (a "\\ud800" JSON escape: no character) replaced by U+FFFD, as undecodable
    bytes of a text file are: the tokenizer cannot encode one."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)
    return text


def iter_jsonl(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) for each non-empty line of a JSONL file; ValueError names a line that is not JSON."""
    with path.open(encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except (json.JSONDecodeError, RecursionError) as e:
                raise ValueError(f"{path}:{n} is not valid JSON: {str(e)[:200]}") from None


def _read_documents(path: Path, piece_chars: int) -> Iterator[Iterable[str]]:
    """The documents in one file, by its suffix: each an iterable of text chunks (a text file's read a piece at a
    time, so a file with no line break is never held whole)."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        for n, record in iter_jsonl(path):
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{path}:{n}: expected an object with a string 'text' field")
            yield (_without_lone_surrogates(record["text"]),)
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"{path}: reading Parquet needs pyarrow (pip install 'seekmoe[parquet]')") from None
        table = pq.ParquetFile(path)
        if "text" not in table.schema_arrow.names:
            raise ValueError(f"{path}: expected a 'text' column, found {table.schema_arrow.names}")
        for batch in table.iter_batches(batch_size=256, columns=["text"]):  # not 65536 long rows at once
            yield from ((t,) for t in batch.column(0).to_pylist() if t)
    else:
        # One document per file, read `piece_chars` characters at a time whatever its lines.
        with path.open(encoding="utf-8", errors="replace") as f:
            yield iter(lambda: f.read(piece_chars), "")
