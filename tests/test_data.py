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
