"""Corpus discovery, tokenizer training, cached token shards, document-level validation split, resumable order."""

import json
import shutil
import sysconfig
from pathlib import Path

import pytest

from seekmoe.data import (BOS_TOKEN, EOS_TOKEN, PackedSequences, SequenceOrder, default_corpus, discover_corpus,
                          prepare_data, train_tokenizer)

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SAMPLE_MODULES = ["textwrap.py", "bisect.py", "heapq.py", "fnmatch.py", "keyword.py", "colorsys.py", "shlex.py",
                  "glob.py", "string.py", "numbers.py", "abc.py", "copy.py"]


def stdlib_sample(folder: Path) -> Path:
    """A small real corpus: a dozen standard-library modules copied into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in SAMPLE_MODULES:
        shutil.copy(STDLIB / name, folder / name)
    return folder


def test_default_corpus_is_the_stdlib_source_without_test_folders():
    corpus = default_corpus()
    assert len(corpus.files) > 100
    assert all(p.suffix == ".py" for p in corpus.files)
    assert not any({"test", "tests", "site-packages"} & set(p.parts) for p in corpus.files)


def test_discover_reads_text_folders_with_glob_jsonl_and_parquet(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("alpha")
    (tmp_path / "docs" / "sub").mkdir()
    (tmp_path / "docs" / "sub" / "b.txt").write_text("beta")
    (tmp_path / "docs" / "c.md").write_text("gamma")
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "delta"}) + "\n\n" + json.dumps({"text": "epsilon"}) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["zeta", "eta"]}), tmp_path / "e.parquet")
    corpus = discover_corpus([tmp_path / "docs", tmp_path / "d.jsonl", tmp_path / "e.parquet"], glob="*.txt")
    assert list(corpus.documents()) == ["alpha", "beta", "delta", "epsilon", "zeta", "eta"]


def test_missing_data_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.txt: no such file or folder"):
        discover_corpus([tmp_path / "nowhere.txt"])


def test_empty_corpus_is_a_clear_error(tmp_path):
    (tmp_path / "empty.txt").write_text("   \n")
    corpus = discover_corpus([tmp_path / "empty.txt"])
    with pytest.raises(ValueError, match="is empty"):
        prepare_data(corpus, 300, cache_dir=tmp_path / "cache", progress=False)
    (tmp_path / "none").mkdir()
    with pytest.raises(ValueError, match="holds no files"):
        discover_corpus([tmp_path / "none"])


def test_tokenizer_puts_special_tokens_first_and_round_trips_bytes():
    tok = train_tokenizer(["def f(x):\n    return x + 1\n"] * 20, vocab_size=300)
    assert tok.token_to_id(BOS_TOKEN) == 0 and tok.token_to_id(EOS_TOKEN) == 1
    text = "naïve ∑ λ: print('ok')\n"
    assert tok.decode(tok.encode(text).ids) == text


def test_shards_are_cached_and_validation_is_held_out_by_document(tmp_path):
    corpus = discover_corpus([stdlib_sample(tmp_path / "corpus")])
    first = prepare_data(corpus, 512, val_fraction=0.2, cache_dir=tmp_path / "cache", progress=False)
    again = prepare_data(corpus, 512, val_fraction=0.2, cache_dir=tmp_path / "cache", progress=False)
    assert first.meta["tokenize_s"] > 0 and again.meta["tokenize_s"] == 0 and again.meta["tokenizer_s"] == 0
    assert first.meta["val"]["documents"] >= 1 and first.meta["train"]["documents"] >= 1
    assert first.meta["val"]["documents"] + first.meta["train"]["documents"] == len(SAMPLE_MODULES)
    assert (again.val_tokens == first.val_tokens).all()
    # each held-out document is whole: the validation stream decodes to BOS + a complete module + EOS, repeated
    docs = [d for d in first.tokenizer.decode(list(first.val_tokens), skip_special_tokens=False)
            .split(EOS_TOKEN) if d]
    originals = {p.read_text() for p in corpus.files}
    assert docs and all(d.startswith(BOS_TOKEN) and d[len(BOS_TOKEN):] in originals for d in docs)


def test_sequence_order_resumes_exactly_and_covers_every_sequence_once_per_epoch():
    order = SequenceOrder(10, seed=3)
    first = order.take(7)
    state = order.state_dict()
    rest = order.take(8)
    resumed = SequenceOrder(10, seed=3)
    resumed.load_state_dict(state)
    assert resumed.take(8) == rest
    assert sorted(first + rest[:3]) == list(range(10))


def test_packed_sequences_cut_fixed_length_rows():
    import numpy as np

    seqs = PackedSequences(np.arange(25, dtype=np.uint16), seq_len=8)
    assert len(seqs) == 3
    assert seqs.batch([2, 0]).tolist() == [list(range(16, 24)), list(range(8))]
    with pytest.raises(ValueError, match="fewer than one sequence"):
        PackedSequences(np.arange(5, dtype=np.uint16), seq_len=8)


# ------------------------------------------------------------------ bounded-memory, resumable tokenizing (issue 26)
def reference_streams(texts: list[str], tokenizer, val_fraction: float):
    """What tokenizing did before issue 26: every non-empty document encoded whole, BOS + ids + EOS, held out by the
    hash of its text (the lowest draw when none falls under val_fraction)."""
    import hashlib

    import numpy as np

    tokenizer = type(tokenizer).from_str(tokenizer.to_str())
    tokenizer.encode_special_tokens = True  # a special token's name in a document is text (issue 26)
    docs = [t for t in texts if t.strip()]
    draws = [int.from_bytes(hashlib.blake2b(d.encode("utf-8", "replace"), digest_size=8).digest(), "big") / 2**64
             for d in docs]
    held = {i for i, d in enumerate(draws) if d < val_fraction} or {int(np.argmin(draws))}
    out = {"train": [], "val": []}
    for i, doc in enumerate(docs):
        out["val" if i in held else "train"] += [0] + tokenizer.encode(doc, add_special_tokens=False).ids + [1]
    return out


def awkward_corpus(folder: Path) -> Path:
    """Stdlib modules plus files whose whitespace makes cutting hard: runs of spaces before newlines, tabs, CRLF,
    one long line, an empty and a whitespace-only file, a JSONL document, and special tokens' names as text."""
    stdlib_sample(folder)
    (folder / "spaces.txt").write_text("a  \n  b\t\tc \n\n\n   d   e\r\nf" * 40 + "   \n ")
    (folder / "one_line.txt").write_text(" ".join(f"word{i}  x,y" for i in range(3000)))
    (folder / "empty.txt").write_text("")
    (folder / "blank.txt").write_text(" \n\t \n")
    (folder / "d.jsonl").write_text(json.dumps({"text": "x = 1  \n    y = 2\n" * 200}) + "\n")
    (folder / "special.txt").write_text(f"text{EOS_TOKEN}more {BOS_TOKEN} and {EOS_TOKEN}\n" * 30)
    return folder


@pytest.mark.parametrize("piece_chars", [97, 4096])
def test_tokenizing_in_pieces_gives_the_ids_of_whole_documents(tmp_path, piece_chars):
    import numpy as np

    from seekmoe.data.tokenizing import tokenize_corpus

    corpus = discover_corpus([awkward_corpus(tmp_path / "corpus")], glob="*")
    texts = list(corpus.documents())
    tok = train_tokenizer(texts, vocab_size=600)
    meta = tokenize_corpus(tmp_path / "out", corpus, tok, 0.2, progress=False, piece_chars=piece_chars,
                           batch_pieces=3)
    expected = reference_streams(texts, tok, 0.2)
    for name in ("train", "val"):
        got = np.fromfile(tmp_path / "out" / f"{name}.bin", dtype=meta["dtype"]).tolist()
        assert got == expected[name]
        assert meta[name]["tokens"] == len(got)
        assert got.count(1) == got.count(0) == meta[name]["documents"]  # "<|end_of_text|>" in special.txt is text
    assert meta["train"]["documents"] + meta["val"]["documents"] == len([t for t in texts if t.strip()])


def test_a_tokenizer_trained_on_pieces_learns_the_merges_of_whole_documents(tmp_path):
    from seekmoe.data.tokenizing import nonempty_pieces

    corpus = discover_corpus([awkward_corpus(tmp_path / "corpus")])
    whole = json.loads(train_tokenizer([t for t in corpus.documents() if t.strip()], vocab_size=500).to_str())
    pieces = list(nonempty_pieces(corpus, piece_chars=61))
    assert max(len(p) for p in pieces) <= 61 and len(pieces) > 100
    cut = json.loads(train_tokenizer(pieces, vocab_size=500).to_str())
    # the same pre-token counts, so the same tokens and merges (equal counts may be merged in another order)
    assert set(cut["model"]["vocab"]) == set(whole["model"]["vocab"])
    assert sorted(map(tuple, cut["model"]["merges"])) == sorted(map(tuple, whole["model"]["merges"]))


def test_a_killed_tokenizing_run_keeps_what_it_wrote_and_a_rerun_finishes_it(tmp_path, monkeypatch):
    import numpy as np

    import seekmoe.data.tokenizing as tokenizing

    corpus = discover_corpus([stdlib_sample(tmp_path / "corpus")])
    tok = train_tokenizer(corpus.documents(), vocab_size=400)
    kwargs = dict(progress=False, piece_chars=500, commit_chars=2000, batch_pieces=2)
    clean = tokenizing.tokenize_corpus(tmp_path / "clean", corpus, tok, 0.2, **kwargs)
    encoded = []
    real_encode = tokenizing._encode

    def encode_then_die(tokenizer, texts, dtype):
        if len(encoded) == 40:
            raise KeyboardInterrupt  # stands for a kill: nothing after this point runs
        encoded.append(len(texts))
        return real_encode(tokenizer, texts, dtype)

    monkeypatch.setattr(tokenizing, "_encode", encode_then_die)
    with pytest.raises(KeyboardInterrupt):
        tokenizing.tokenize_corpus(tmp_path / "run", corpus, tok, 0.2, **kwargs)
    progress = json.loads((tmp_path / "run" / "progress.json").read_text())
    assert 0 < progress["pieces"] <= 80
    with (tmp_path / "run" / "train.bin").open("ab") as f:
        f.write(b"\x07" * 6)  # a torn write after the last progress record
    encoded.clear()
    monkeypatch.setattr(tokenizing, "_encode", lambda *a: encoded.append(len(a[1])) or real_encode(*a))
    resumed = tokenizing.tokenize_corpus(tmp_path / "run", corpus, tok, 0.2, **kwargs)
    total = sum(1 for _ in corpus.pieces(500))
    assert sum(encoded) == total - progress["pieces"]  # only what was not recorded is encoded again
    assert resumed == clean
    for name in ("train", "val"):
        assert (np.fromfile(tmp_path / "run" / f"{name}.bin", dtype=np.uint16)
                == np.fromfile(tmp_path / "clean" / f"{name}.bin", dtype=np.uint16)).all()


def test_the_tokenizing_bar_counts_bytes_within_one_document(tmp_path, monkeypatch):
    import seekmoe.data.tokenizing as tokenizing

    updates = []

    class Bar:
        def __init__(self, total, desc, unit="it", enabled=True, initial=0):
            self.desc = desc
            updates.append((desc, "total", total))

        def update(self, n):
            updates.append((self.desc, "update", n))

        def close(self):
            pass

    text = "lorem ipsum dolor sit amet " * 2000
    (tmp_path / "big.txt").write_text(text)
    (tmp_path / "small.txt").write_text("hello world")
    monkeypatch.setattr(tokenizing, "show_progress", Bar)
    corpus = discover_corpus([tmp_path])
    tok = train_tokenizer(corpus.documents(), vocab_size=300)
    tokenizing.tokenize_corpus(tmp_path / "out", corpus, tok, 0.0, progress=True, piece_chars=1000, batch_pieces=2)
    moves = [n for desc, kind, n in updates if desc == "tokenizing" and kind == "update"]
    assert ("tokenizing", "total", len(text) + 11) in updates
    assert len(moves) > 20 and sum(moves) == len(text) + 11  # it moves while the one big document is encoded


_MEMORY_PROBE = """
import random, resource, sys
from pathlib import Path
import seekmoe.data.tokenizing as tokenizing
from seekmoe.data import discover_corpus, prepare_data
tokenizing.encode_threads = lambda: 2  # batches sized for 2 cores whatever this machine has
folder, size = Path(sys.argv[1]), int(sys.argv[2])
rng = random.Random(0)
words = ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(1, 9))) for _ in range(5000)]
(folder / "one_line.txt").write_text(" ".join(rng.choice(words) for _ in range(size // 5))[:size])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
prepare_data(discover_corpus([folder / "one_line.txt"]), 300, val_fraction=0.0, cache_dir=folder / "cache",
             progress=False)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_a_single_line_corpus_is_tokenized_in_memory_bounded_by_the_piece_size(tmp_path):
    """Before issue 26 a 1.5 MB line peaked 385 MB above the start (~250x the text; 1 MB: ~260 MB): it went to
    encode_batch whole."""
    import os
    import subprocess
    import sys

    from seekmoe.data.corpus import PIECE_CHARS

    env = {**os.environ, "RAYON_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "true"}
    result = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(tmp_path), str(1_000_000)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    growth = int(result.stdout.split()[-1])
    # ~170 bytes a character inside `tokenizers` (measured); 2 batches of 2 x 2 pieces in flight, and slack
    assert growth < 12 * 170 * PIECE_CHARS, f"peak memory grew {growth / 2**20:.0f} MiB"


def test_prepare_data_carries_on_from_a_killed_run_and_leaves_no_work_folder(tmp_path, monkeypatch):
    import seekmoe.data.tokenizing as tokenizing

    corpus = discover_corpus([stdlib_sample(tmp_path / "corpus")])
    clean = prepare_data(corpus, 400, val_fraction=0.2, cache_dir=tmp_path / "clean", progress=False)
    monkeypatch.setattr(tokenizing, "COMMIT_CHARS", 1000)  # a progress record after every batch
    monkeypatch.setattr(tokenizing, "encode_threads", lambda: 1)  # batches of 2 documents
    calls = []
    real_encode = tokenizing._encode

    def encode_then_die(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_encode(*args)

    monkeypatch.setattr(tokenizing, "_encode", encode_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(corpus, 400, val_fraction=0.2, cache_dir=tmp_path / "run", tokenizer=clean.tokenizer,
                     progress=False)
    (partial,) = (tmp_path / "run" / "tokens").glob(".partial-*")
    assert json.loads((partial / "progress.json").read_text())["pieces"] > 0
    monkeypatch.setattr(tokenizing, "_encode", real_encode)
    resumed = prepare_data(corpus, 400, val_fraction=0.2, cache_dir=tmp_path / "run", tokenizer=clean.tokenizer,
                           progress=False)
    assert (resumed.train_tokens == clean.train_tokens).all() and (resumed.val_tokens == clean.val_tokens).all()
    assert not list((tmp_path / "run" / "tokens").glob(".partial-*"))
    assert sorted(p.name for p in (tmp_path / "run" / "tokens" / Path(resumed.meta["cache_dir"]).name).iterdir()) \
        == ["meta.json", "train.bin", "val.bin"]
