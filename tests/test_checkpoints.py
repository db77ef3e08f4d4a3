"""Training checkpoints: one DCP format, old single-process checkpoints still resume, `seekmoe export` and
--save-hf-every write model folders, a hostile DCP index is refused, `--resume` refuses (touching nothing) when no
checkpoint is intact and `--resume-or-start` moves the old run aside, temporaries of killed writers are removed at
start, and a kill while metrics.jsonl is being cut back on resume loses no record."""

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

import seekmoe
from seekmoe.cli import main
from seekmoe.train import load_run_config, train
from seekmoe.train.checkpointing import latest_checkpoint
from seekmoe.train.metrics import read_metrics

LEGACY = Path(__file__).parent / "data" / "legacy_checkpoint"
# The settings tests/data/legacy_checkpoint/make.py trained with (tiny, shrunk so the stored files stay small).
LEGACY_OVERRIDES = dict(vocab_size=280, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
                        num_attention_heads=2, n_routed_experts=4, n_group=2, topk_group=1, q_lora_rank=8,
                        kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, seq_len=32, batch_size=2,
                        warmup_steps=1, max_steps=4, save_every=2, eval_every=2, eval_batches=1, precision="fp32",
                        keep_checkpoints=1)


def tiny(cache, **overrides):
    return load_run_config("tiny", overrides={"seq_len": 32, "batch_size": 2, "warmup_steps": 1, "eval_every": 100,
                                              "eval_batches": 1, "cache_dir": str(cache), "precision": "fp32",
                                              "save_every": 2, **overrides})


def cli_args(corpus, cache, out, *extra):
    return ["train", "--preset", "tiny", "--out", str(out), "--data", str(corpus), "--no-progress", "seq_len=32",
            "batch_size=2", "precision=fp32", "warmup_steps=1", "eval_every=100", "eval_batches=1",
            f"cache_dir={cache}", *extra]


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _legacy_corpus(folder: Path) -> Path:
    """The corpus tests/data/legacy_checkpoint/make.py trained on (generated, not stored)."""
    animals = ["cat", "dog", "owl", "fox", "eel", "bee", "yak"]
    verbs = ["sees", "likes", "finds", "moves", "keeps"]
    things = ["box", "tree", "stone", "cup", "hat", "rope", "map", "lamp", "coin", "key", "bell"]
    text = [f"the {animals[i % 7]} {verbs[(i * 3) % 5]} the {things[(i * 5) % 11]} number {i % 97}.\n"
            for i in range(3000)]
    folder.mkdir(parents=True)
    for k in range(6):
        (folder / f"part{k}.txt").write_text("".join(text[k * 500:(k + 1) * 500]))
    return folder


def test_a_stored_old_format_checkpoint_resumes_and_continues_the_uninterrupted_run(tmp_path):
    from safetensors.torch import load_file

    from seekmoe.train.trainer import Trainer

    run = tmp_path / "run"
    shutil.copytree(LEGACY, run, ignore=shutil.ignore_patterns("make.py", "uninterrupted.json"))
    corpus = _legacy_corpus(tmp_path / "corpus")
    overrides = {**LEGACY_OVERRIDES, "cache_dir": str(tmp_path / "cache")}
    model_config, config = load_run_config("tiny", overrides=overrides)
    trainer = Trainer(model_config, config, run, data=[str(corpus)], resume=True, progress=False)
    stored = run / "checkpoints" / "step-00000002"
    assert trainer.start_step == 2
    weights = seekmoe.from_pretrained(stored).state_dict()
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, weights[name]), name
    moments = load_file(str(stored / "optimizer.safetensors"))
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    for p, state in trainer.optimizer.state.items():
        assert torch.equal(state["exp_avg"], moments[f"{names[id(p)]}.exp_avg"]), names[id(p)]
    trainer.run()
    want = json.loads((LEGACY / "uninterrupted.json").read_text())
    got = read_metrics(run)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for record, loss, val in zip(got, want["losses"], want["val_loss"]):
        assert record["loss"] == pytest.approx(loss, rel=1e-4), record["step"]
        assert record.get("val_loss") == (None if val is None else pytest.approx(val, rel=1e-4))
    assert (run / "checkpoints" / "step-00000004" / "dcp" / ".metadata").is_file()  # written in the new format
    assert not stored.exists()  # pruned like any other (keep_checkpoints=1)


def test_export_writes_the_checkpoints_model_as_a_hugging_face_folder(corpus, cache, tmp_path, capsys):
    model_config, config = tiny(cache, max_steps=4, save_every=2, keep_checkpoints=2, save_hf_every=2)
    train(model_config, config, tmp_path / "run", data=[str(corpus)], progress=False)
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "exported")]) == 0
    assert "step-00000004" in capsys.readouterr().out
    final, exported = (seekmoe.from_pretrained(p) for p in (tmp_path / "run" / "final", tmp_path / "exported"))
    for (name, a), b in zip(final.state_dict().items(), exported.state_dict().values()):
        assert torch.equal(a, b), name
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "exported" / name).read_bytes() == (tmp_path / "run" / "final" / name).read_bytes()
    # --save-hf-every 2: model folders at steps 2 and 4, the one at 4 equal to final/
    hf = seekmoe.from_pretrained(tmp_path / "run" / "hf" / "step-00000004")
    assert all(torch.equal(a, b) for a, b in zip(final.state_dict().values(), hf.state_dict().values()))
    step2 = tmp_path / "run" / "checkpoints" / "step-00000002"
    assert main(["export", "--checkpoint", str(step2), "--out", str(tmp_path / "two")]) == 0
    two = seekmoe.from_pretrained(tmp_path / "two")
    hf2 = seekmoe.from_pretrained(tmp_path / "run" / "hf" / "step-00000002")
    assert all(torch.equal(a, b) for a, b in zip(two.state_dict().values(), hf2.state_dict().values()))
    from seekmoe.train.export import checkpoint_model  # what `seekmoe analyze --compare CHECKPOINT` loads

    assert all(torch.equal(a, b) for a, b in zip(checkpoint_model(step2).state_dict().values(),
                                                  hf2.state_dict().values()))
    assert main(["export", "--checkpoint", str(step2), "--out", str(tmp_path / "two")]) == 2
    assert "not empty" in capsys.readouterr().err
    (step2 / "dcp" / "__0_0.distcp").write_bytes(b"\0" * 64)
    assert main(["export", "--checkpoint", str(step2), "--out", str(tmp_path / "three")]) == 2
    err = capsys.readouterr().err
    assert "__0_0.distcp does not match its checksum" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "three").exists()


def test_a_dcp_index_naming_anything_but_dcp_classes_is_refused(tmp_path):
    from seekmoe.train.sharded_checkpoint import load_dcp_state, save_dcp_state

    model = seekmoe.build_model(seekmoe.ModelConfig.preset("tiny"))
    save_dcp_state(tmp_path / "dcp", model, None)
    other = seekmoe.build_model(seekmoe.ModelConfig.preset("tiny"))
    load_dcp_state(tmp_path, other, None)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))

    class Hostile:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    (tmp_path / "dcp" / ".metadata").write_bytes(pickle.dumps(Hostile()))
    with pytest.raises(ValueError, match="names posix.system, which DCP never writes"):
        load_dcp_state(tmp_path, other, None)
    assert not (tmp_path / "pwned").exists()


def test_resume_with_every_checkpoint_corrupt_refuses_and_touches_nothing(corpus, cache, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(cli_args(corpus, cache, run, "--max-steps", "6", "--save-every", "2",
                         "--stop-at", "4")) == 0
    for step in ("step-00000002", "step-00000004"):
        shard = run / "checkpoints" / step / "dcp" / "__0_0.distcp"
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    (run / "checkpoints" / ".tmp-step-00000006").mkdir()  # and a killed writer's leftover
    before = snapshot(run)
    capsys.readouterr()
    assert main(cli_args(corpus, cache, run, "--max-steps", "6", "--resume")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "nothing intact to resume" in err and "--resume-or-start" in err
    assert "step-00000004: dcp/__0_0.distcp does not match its checksum" in err
    assert "step-00000002: dcp/__0_0.distcp does not match its checksum" in err
    assert snapshot(run) == before and (run / "checkpoints" / ".tmp-step-00000006").is_dir()

    assert main(cli_args(corpus, cache, run, "--max-steps", "2", "--resume-or-start")) == 0
    out = capsys.readouterr().out
    previous = [p for p in run.iterdir() if p.name.startswith("previous-run-")]
    assert len(previous) == 1 and f"moved that run to {previous[0]}" in out
    moved = snapshot(previous[0])
    assert moved == {k: v for k, v in before.items()}  # the old run whole, not a byte changed
    assert [r["step"] for r in read_metrics(run)] == [1, 2]
    assert latest_checkpoint(run).name == "step-00000002"


def test_resume_in_a_new_folder_starts_and_a_folder_holding_only_metrics_is_refused(corpus, cache, tmp_path, capsys):
    assert main(cli_args(corpus, cache, tmp_path / "new", "--max-steps", "1", "--resume")) == 0
    assert [r["step"] for r in read_metrics(tmp_path / "new")] == [1]
    (tmp_path / "killed").mkdir()  # a run killed before its first checkpoint
    (tmp_path / "killed" / "metrics.jsonl").write_text('{"step": 1, "loss": 6.0}\n')
    assert main(cli_args(corpus, cache, tmp_path / "killed", "--max-steps", "1", "--resume")) == 2
    assert "no checkpoint, only metrics.jsonl" in capsys.readouterr().err
    assert (tmp_path / "killed" / "metrics.jsonl").read_text() == '{"step": 1, "loss": 6.0}\n'


def test_temporaries_left_by_killed_writers_are_removed_when_a_run_resumes(corpus, cache, tmp_path):
    model_config, config = tiny(cache, max_steps=4)
    run = tmp_path / "run"
    train(model_config, config, run, data=[str(corpus)], progress=False, stop_at=2)
    leftovers = [run / "checkpoints" / ".tmp-step-00000004", run / "checkpoints" / "..tmp-step-00000004-7.saving-7",
                 run / ".tmp-final-9", run / "..tmp-final-9.saving-9", run / ".final.saving-3", run / "hf" / ".tmp-x"]
    for path in leftovers:
        path.mkdir(parents=True)
        (path / "model.safetensors").write_bytes(b"\0" * 1000)
    (run / ".tmp-metrics.jsonl-5").write_text("{}\n")
    with pytest.warns(UserWarning):
        train(model_config, config, run, data=[str(corpus)], progress=False, resume=True)
    assert not [p for p in run.rglob(".*") if p.name != ".metadata"]
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]


def test_a_kill_while_metrics_are_cut_back_on_resume_loses_no_record(corpus, cache, tmp_path, monkeypatch):
    import seekmoe.train.metrics as metrics

    model_config, config = tiny(cache, max_steps=4, keep_checkpoints=3)
    run = tmp_path / "run"
    train(model_config, config, run, data=[str(corpus)], progress=False, stop_at=3)  # checkpoints 2 and 3
    shutil.rmtree(run / "checkpoints" / "step-00000003")  # resume from 2: record 3 must go
    whole = (run / "metrics.jsonl").read_text()

    def killed(src, dst):  # the process dies after writing the new file, before the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(metrics.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        train(model_config, config, run, data=[str(corpus)], progress=False, resume=True)
    assert (run / "metrics.jsonl").read_text() == whole  # every record still there
    monkeypatch.undo()
    train(model_config, config, run, data=[str(corpus)], progress=False, resume=True)
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [json.loads(line) for line in whole.splitlines()][:2] == records[:2]
    assert not [p for p in run.iterdir() if p.name.startswith(".")]
