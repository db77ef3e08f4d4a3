"""Nothing a crash, a corrupted file or a hostile input does loses work or allocates blindly (issue 10)."""

import json

import pytest
import torch

import seekmoe
from seekmoe import ModelConfig
from seekmoe.data import discover_corpus
from seekmoe.train import load_run_config, train
from seekmoe.train.checkpointing import CheckpointWarning, latest_checkpoint, verify_checkpoint
from seekmoe.train.metrics import read_metrics



def tiny(cache, **overrides):
    return load_run_config("tiny", overrides={"seq_len": 32, "batch_size": 2, "warmup_steps": 1, "eval_every": 100,
                                              "eval_batches": 1, "cache_dir": str(cache), "precision": "fp32",
                                              **overrides})


def test_an_empty_manifest_next_to_garbage_does_not_verify(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    (tmp_path / "manifest.json").write_text("{}")
    assert "no model weights" in verify_checkpoint(tmp_path) or "malformed" in verify_checkpoint(tmp_path)


def test_a_malformed_manifest_is_skipped_with_a_warning_not_a_key_error(tmp_path):
    folder = tmp_path / "checkpoints" / "step-00000002"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"files": {"model.safetensors": {"size": 3}}}))
    with pytest.warns(CheckpointWarning, match="malformed"):
        assert latest_checkpoint(tmp_path) is None


def test_resume_sets_aside_a_corrupt_newer_checkpoint_and_keeps_the_one_it_writes(corpus, tmp_path):
    model_config, config = tiny(tmp_path / "cache", max_steps=4, save_every=2, keep_checkpoints=1)
    train(model_config, config, tmp_path / "run", data=[str(corpus)], progress=False, stop_at=4)
    # keep_checkpoints=1 left step 4 alone; make it corrupt and bring back a good step 2 by training it again
    run = tmp_path / "run"
    steps = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert steps == ["step-00000004"]
    model_config, config = tiny(tmp_path / "cache", max_steps=6, save_every=2, keep_checkpoints=1)
    train(model_config, config, tmp_path / "run2", data=[str(corpus)], progress=False, stop_at=2)
    good = tmp_path / "run2" / "checkpoints" / "step-00000002"
    good.rename(run / "checkpoints" / "step-00000002")
    weights = run / "checkpoints" / "step-00000004" / "dcp" / "__0_0.distcp"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.warns(CheckpointWarning):
        train(model_config, config, run, data=[str(corpus)], progress=False, resume=True, stop_at=4)
    # the resumed run wrote a good step 4 and kept it; the corrupt one was moved aside, not deleted
    assert verify_checkpoint(run / "checkpoints" / "step-00000004") is None
    assert len(list((run / "checkpoints" / "set-aside").iterdir())) == 1


def test_a_torn_last_metrics_line_is_dropped_on_resume(corpus, tmp_path):
    model_config, config = tiny(tmp_path / "cache", max_steps=4, save_every=2)
    train(model_config, config, tmp_path, data=[str(corpus)], progress=False, stop_at=2)
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "loss": 5.1')  # power lost mid-write
    with pytest.warns(UserWarning, match="metrics.jsonl:3"):
        train(model_config, config, tmp_path, data=[str(corpus)], progress=False, resume=True)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]


def test_a_crash_while_saving_keeps_the_previous_model_and_other_files(tmp_path, monkeypatch):
    import seekmoe.checkpoint as checkpoint

    torch.manual_seed(0)
    model = seekmoe.build_model(ModelConfig.preset("tiny"))
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "tokenizer.json").write_text("{}")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "_write_shard", crash)
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
    seekmoe.from_pretrained(tmp_path / "m")
    monkeypatch.undo()
    model.save_pretrained(tmp_path / "m", max_shard_bytes=200_000)  # now sharded: the single file goes
    assert not (tmp_path / "m" / "model.safetensors").exists()
    assert (tmp_path / "m" / "tokenizer.json").read_text() == "{}"
    assert torch.equal(seekmoe.from_pretrained(tmp_path / "m").lm_head.weight, model.lm_head.weight)


def test_binary_files_in_a_data_folder_are_skipped_and_counted(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("def f():\n    return 1\n")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + bytes(range(256)))
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 8)
    corpus = discover_corpus([tmp_path])
    assert [p.name for p in corpus.files] == ["a.txt"] and corpus.skipped == 2
    assert "2 non-text file(s) skipped" in corpus.name
    assert "skipped 2 non-text" in capsys.readouterr().out


def test_a_hostile_config_is_refused_before_any_allocation(tmp_path, monkeypatch):
    seekmoe.build_model(ModelConfig.preset("tiny")).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["vocab_size"] = 3_000_000  # within bounds (model_folder.BOUNDS): the headers refuse it
    (tmp_path / "config.json").write_text(json.dumps(config))

    def no_allocation(*args, **kwargs):
        raise AssertionError("the model was allocated before its shapes were checked")

    monkeypatch.setattr(torch.nn.Module, "to_empty", no_allocation)
    with pytest.raises(ValueError, match="shape .*3000000"):
        seekmoe.from_pretrained(tmp_path)


def test_shard_names_in_an_index_must_stay_inside_the_model_folder(tmp_path):
    seekmoe.build_model(ModelConfig.preset("tiny")).save_pretrained(tmp_path, max_shard_bytes=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = "../../etc/passwd"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="outside the model folder"):
        seekmoe.from_pretrained(tmp_path)


# ------------------------------------------------------------- hostile model folders and data: one clear line (issue 26)
def _hostile_model(folder, sharded: bool = False):
    """A tiny model folder with weights and a tokenizer (what `seekmoe generate --model` reads)."""
    from test_inference_tokenizer import make_model_dir

    make_model_dir(folder)
    if sharded:
        seekmoe.build_model(ModelConfig.preset("tiny")).save_pretrained(folder, max_shard_bytes=200_000)
    return folder


def _generate_fails_cleanly(folder, capsys, *expected: str) -> None:
    """`seekmoe generate --model folder` exits 2 with one line naming what was wrong, and so does from_pretrained."""
    from seekmoe.cli import main

    assert main(["generate", "--model", str(folder), "--prompt", "x", "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().count("\n") == 0, err
    for text in expected:
        assert text in err, err


@pytest.mark.parametrize("value", [{"file": "model-00001.safetensors"}, 3, ["a.safetensors"], None])
def test_an_index_whose_weight_map_names_no_file_is_a_clear_error(tmp_path, capsys, value):
    _hostile_model(tmp_path, sharded=True)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    key = sorted(index["weight_map"])[3]
    index["weight_map"][key] = value
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"weight_map\[.*expected the name of a \.safetensors file"):
        seekmoe.from_pretrained(tmp_path)
    _generate_fails_cleanly(tmp_path, capsys, "model.safetensors.index.json", key)


@pytest.mark.parametrize("index", [[1, 2], {"weight_map": [1]}, "{" * 100_000])
def test_an_index_that_is_no_object_is_a_clear_error(tmp_path, capsys, index):
    _hostile_model(tmp_path, sharded=True)
    text = index if isinstance(index, str) else json.dumps(index)
    (tmp_path / "model.safetensors.index.json").write_text(text)
    with pytest.raises(ValueError, match="index"):
        seekmoe.from_pretrained(tmp_path)
    _generate_fails_cleanly(tmp_path, capsys, "model.safetensors.index.json")


@pytest.mark.parametrize("header", [b"\xff" * 8, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}", b"12"])
def test_a_broken_safetensors_header_is_a_clear_error(tmp_path, capsys, header):
    _hostile_model(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(header + weights.read_bytes()[len(header):] if len(header) > 2 else header)
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        seekmoe.from_pretrained(tmp_path)
    _generate_fails_cleanly(tmp_path, capsys, str(weights), "not a valid safetensors file")


@pytest.mark.parametrize("sharded", [False, True])
def test_a_shard_that_is_a_directory_is_a_clear_error(tmp_path, capsys, sharded):
    _hostile_model(tmp_path, sharded=sharded)
    if sharded:
        shard = tmp_path / sorted(set(json.loads((tmp_path / "model.safetensors.index.json").read_text())
                                      ["weight_map"].values()))[0]
    else:
        shard = tmp_path / "model.safetensors"
    shard.unlink()
    shard.mkdir()
    with pytest.raises(ValueError, match="is a directory"):
        seekmoe.from_pretrained(tmp_path)
    _generate_fails_cleanly(tmp_path, capsys, str(shard), "is a directory")


@pytest.mark.parametrize("content", ["{not json", "[]", '{"model": {"type": "BPE", "vocab": 3}}', None])
def test_an_invalid_tokenizer_file_is_a_clear_error(tmp_path, capsys, content):
    from seekmoe.inference.tokenizer import Tokenizer

    _hostile_model(tmp_path)
    tok = tmp_path / "tokenizer.json"
    tok.unlink()
    tok.mkdir() if content is None else tok.write_text(content)
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer(tmp_path)
    _generate_fails_cleanly(tmp_path, capsys, str(tok))


def test_an_invalid_tokenizer_file_is_a_clear_error_for_init_from(tmp_path, capsys):
    from seekmoe.cli import main

    _hostile_model(tmp_path / "m")
    (tmp_path / "m" / "tokenizer.json").write_text("{not json")
    assert main(["train", "--init-from", str(tmp_path / "m"), "--out", str(tmp_path / "run"), "--max-steps", "1",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "tokenizer.json" in err, err


@pytest.mark.parametrize("line", ['{"prompt": "hi \\ud800", "completion": "ok"}', b'{"prompt": "\xff", "completion": "x"}',
                                  '{"messages": ' * 50_000])
def test_sft_data_that_is_not_text_is_a_clear_error(tmp_path, capsys, line):
    from seekmoe.cli import main

    _hostile_model(tmp_path / "m")
    good = json.dumps({"prompt": "a", "completion": "b"}) + "\n"
    data = tmp_path / "bad.jsonl"
    data.write_bytes(good.encode() + (line if isinstance(line, bytes) else line.encode()) + b"\n")
    assert main(["sft", "--model", str(tmp_path / "m"), "--data", str(data), "--out", str(tmp_path / "run"),
                 "--max-steps", "1", "--no-progress", "seq_len=32", "batch_size=1", "num_threads=1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().count("\n") == 0 and f"{data}:2" in err, err


def test_a_lone_surrogate_in_pretraining_jsonl_becomes_a_replacement_character(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "a\\ud800b"}\n')
    assert list(discover_corpus([tmp_path / "d.jsonl"]).documents()) == ["a\ufffdb"]
