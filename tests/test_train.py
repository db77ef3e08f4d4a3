"""Pretraining: the loss falls on real text, resume repeats an uninterrupted run exactly, checkpoints survive a
SIGKILL mid-write, the bias update balances load, and bad inputs give clear errors."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import seekmoe
from seekmoe.train import TrainingDiverged, load_run_config, train
from seekmoe.train.checkpointing import CheckpointWarning, latest_checkpoint, load_checkpoint
from seekmoe.train.config import TrainConfig, stepwise
from seekmoe.train.metrics import read_metrics
from seekmoe.train.optim import build_optimizer, lr_at




def tiny_run(cache: str, **overrides):
    """The tiny preset with short sequences and no plots-worthy length: a few seconds a run."""
    return load_run_config("tiny", overrides={"seq_len": 32, "batch_size": 4, "warmup_steps": 2, "eval_every": 4,
                                              "save_every": 4, "eval_batches": 2, "cache_dir": cache,
                                              "precision": "fp32", **overrides})


def losses(out: Path, key: str = "loss") -> list[float]:
    return [r[key] for r in read_metrics(out) if key in r]


def test_tiny_preset_loss_falls_on_real_text(corpus, cache, tmp_path):
    model_cfg, cfg = tiny_run(cache, max_steps=30, seq_len=64, batch_size=8, lr=1e-2, save_every=30, eval_every=15)
    summary = train(model_cfg, cfg, tmp_path, data=[str(corpus)], progress=False)
    lm = losses(tmp_path, "lm_loss")
    assert lm[0] == pytest.approx(math.log(model_cfg.vocab_size), abs=0.1)
    assert sum(lm[-5:]) / 5 < lm[0] - 0.7, lm
    assert summary["final_val_loss"] < math.log(model_cfg.vocab_size)
    record = read_metrics(tmp_path)[-1]
    for key in ("step", "loss", "lm_loss", "mtp_loss", "balance_loss", "lr", "tokens_per_s", "max_vio",
                "max_vio_worst", "val_loss"):
        assert key in record
    model = seekmoe.from_pretrained(tmp_path / "final")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tmp_path / "final" / "tokenizer.json"))
    assert tok.token_to_id("<|end_of_text|>") == model.config.eos_token_id == 1
    assert (tmp_path / "plots" / "losses.png").is_file() and (tmp_path / "plots" / "expert_load.png").is_file()


def test_resume_after_stop_at_repeats_uninterrupted_losses_exactly(corpus, cache, tmp_path):
    model_cfg, cfg = tiny_run(cache, max_steps=8)
    train(model_cfg, cfg, tmp_path / "whole", data=[str(corpus)], progress=False)
    train(model_cfg, cfg, tmp_path / "split", data=[str(corpus)], stop_at=4, progress=False)
    assert not (tmp_path / "split" / "final").exists()
    train(model_cfg, cfg, tmp_path / "split", data=[str(corpus)], resume=True, progress=False)
    for key in ("loss", "lm_loss", "mtp_loss", "balance_loss", "val_loss", "max_vio"):
        assert losses(tmp_path / "split", key) == losses(tmp_path / "whole", key), key
    whole = seekmoe.from_pretrained(tmp_path / "whole" / "final").state_dict()
    split = seekmoe.from_pretrained(tmp_path / "split" / "final").state_dict()
    assert all(torch.equal(whole[k], split[k]) for k in whole)


def test_training_without_resume_refuses_a_folder_with_checkpoints(corpus, cache, tmp_path):
    model_cfg, cfg = tiny_run(cache, max_steps=2, save_every=1)
    train(model_cfg, cfg, tmp_path, data=[str(corpus)], stop_at=1, progress=False)
    with pytest.raises(ValueError, match="--resume"):
        train(model_cfg, cfg, tmp_path, data=[str(corpus)], progress=False)


# Run by the test below in a subprocess: the writer of checkpoint 4 stops before publishing it, to be killed there.
_PAUSED_WRITER = """
import sys, time
import seekmoe.train.checkpointing as checkpointing
publish = checkpointing.publish
def paused(tmp, final):
    if final.name == "step-00000004":
        print("paused before publishing step 4", flush=True)
        time.sleep(60)
    publish(tmp, final)
checkpointing.publish = paused
from seekmoe.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_while_writing_a_checkpoint_leaves_the_previous_one_and_resume_removes_the_rest(corpus, cache,
                                                                                                tmp_path):
    args = ["train", "--preset", "tiny", "--out", str(tmp_path), "--data", str(corpus), "--max-steps", "6",
            "--save-every", "2", "--no-progress", "seq_len=32", "batch_size=4", "precision=fp32",
            f"cache_dir={cache}"]
    proc = subprocess.Popen([sys.executable, "-c", _PAUSED_WRITER, *args], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 90
    lines = []
    for line in proc.stdout:  # wait until the writer of step 4 has written its shards, not its manifest
        lines.append(line)
        if "paused before publishing" in line or time.time() > deadline:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert "paused before publishing" in "".join(lines), "".join(lines)
    partial = tmp_path / "checkpoints" / ".tmp-step-00000004"
    assert (partial / "dcp" / ".metadata").is_file()  # the full model copy a kill used to leave behind
    with pytest.warns(CheckpointWarning, match="incomplete"):
        newest = latest_checkpoint(tmp_path)
    assert newest.name == "step-00000002"
    model_cfg, cfg = tiny_run(cache)
    model = seekmoe.build_model(model_cfg)
    assert load_checkpoint(newest, model, build_optimizer(model, cfg))["step"] == 2
    from seekmoe.cli import main

    assert main(args + ["--resume"]) == 0
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000004", "step-00000006"]
    assert not [p for p in tmp_path.rglob(".*") if p.name != ".metadata"]  # DCP's index is no leftover
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]


def test_corrupted_checkpoint_is_skipped_with_a_warning(corpus, cache, tmp_path):
    model_cfg, cfg = tiny_run(cache, max_steps=4, save_every=2, keep_checkpoints=3)
    train(model_cfg, cfg, tmp_path, data=[str(corpus)], progress=False)
    weights = tmp_path / "checkpoints" / "step-00000004" / "dcp" / "__0_0.distcp"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.warns(CheckpointWarning, match="step-00000004.*checksum"):
        assert latest_checkpoint(tmp_path).name == "step-00000002"


def test_bias_update_moves_expert_load_toward_balance(corpus, cache, tmp_path):
    vio = {}
    for gamma in (0.0, 0.05):
        model_cfg, cfg = tiny_run(cache, max_steps=12, bias_update_speed=gamma, aux_loss_alpha=0.0,
                                  save_every=12, eval_every=12, bias_update_speed_schedule=[[0.0, 1.0]])
        train(model_cfg, cfg, tmp_path / str(gamma), data=[str(corpus)], progress=False)
        vio[gamma] = sum(losses(tmp_path / str(gamma), "max_vio")[-4:])
    assert vio[0.05] < vio[0.0]
    bias = seekmoe.from_pretrained(tmp_path / "0.05" / "final").moe_layers()[0].gate.e_score_correction_bias
    assert bias.abs().max() > 0


def test_nan_losses_are_skipped_then_stop_training_with_a_clear_message(corpus, cache, tmp_path, monkeypatch):
    import seekmoe.train.trainer as trainer

    def poisoned(config):
        model = seekmoe.build_model(config)
        with torch.no_grad():
            model.lm_head.weight.fill_(float("nan"))
        return model

    monkeypatch.setattr(trainer, "build_model", poisoned)
    model_cfg, cfg = tiny_run(cache, max_steps=10, max_bad_steps=3)
    with pytest.raises(TrainingDiverged, match="3 consecutive steps had a non-finite loss"):
        train(model_cfg, cfg, tmp_path, data=[str(corpus)], progress=False)
    assert [r.get("skipped") for r in read_metrics(tmp_path)] == ["non-finite loss"] * 3


def test_cli_reports_a_missing_data_path_and_an_empty_corpus(tmp_path, capsys):
    from seekmoe.cli import main

    assert main(["train", "--preset", "tiny", "--out", str(tmp_path / "o"), "--data", str(tmp_path / "nope")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    (tmp_path / "blank.txt").write_text("")
    assert main(["train", "--preset", "tiny", "--out", str(tmp_path / "o"), "--data", str(tmp_path / "blank.txt"),
                 f"cache_dir={tmp_path / 'cache'}"]) == 2  # field=value after --data is an override, not a path
    assert "is empty" in capsys.readouterr().err


def test_config_file_and_overrides_set_model_and_training_fields(tmp_path):
    (tmp_path / "run.yaml").write_text("preset: tiny\nlr: 0.001\nnum_nextn_predict_layers: 0\n")
    (tmp_path / "run.toml").write_text('preset = "tiny"\nlr = 0.001\nnum_nextn_predict_layers = 0\n')
    for name in ("run.yaml", "run.toml"):
        model_cfg, cfg = load_run_config(config_file=tmp_path / name, overrides=["num_nextn_predict_layers=2"])
        assert model_cfg.num_nextn_predict_layers == 2 and cfg.lr == 0.001 and model_cfg.hidden_size == 64
    with pytest.raises(ValueError, match="unknown config field.*'learning_rate'"):
        load_run_config("tiny", overrides=["learning_rate=1"])
    with pytest.raises(ValueError, match="TrainConfig.lr_schedule='linear'"):
        load_run_config("tiny", overrides=["lr_schedule=linear"])


def test_schedules_warm_up_then_decay_and_step_like_deepseek_v3():
    cfg = TrainConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(109, cfg) == pytest.approx(0.1, abs=1e-3)
    wsd = TrainConfig(lr=1.0, min_lr_ratio=0.0, warmup_steps=10, max_steps=110, lr_schedule="wsd",
                      decay_fraction=0.5)
    assert lr_at(50, wsd) == 1.0 and lr_at(82, wsd) == pytest.approx(0.5, abs=0.02)
    assert stepwise(cfg.mtp_loss_weight_schedule, 0, 148) == 1.0
    assert stepwise(cfg.mtp_loss_weight_schedule, 100, 148) == pytest.approx(1 / 3)
    assert stepwise(cfg.bias_update_speed_schedule, 144, 148) == 0.0


def test_no_weight_decay_on_norms_biases_and_embeddings(tiny_config):
    model = seekmoe.build_model(tiny_config)
    decay, no_decay = build_optimizer(model, TrainConfig()).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert no_decay["weight_decay"] == 0
    assert {names[id(p)] for p in no_decay["params"]} >= {"model.embed_tokens.weight", "model.norm.weight"}
    assert all(p.ndim >= 2 for p in decay["params"])


def test_the_step_passes_the_mtp_weight_to_the_objective_and_leaves_the_config_alone():
    """The MTP lambda of the schedule reaches the loss as an argument: the model's config is never rewritten."""
    from seekmoe.train.step import TrainStep, language_model_forward

    config = seekmoe.ModelConfig.preset("tiny", mtp_loss_weight=0.3)
    torch.manual_seed(0)
    model = seekmoe.build_model(config).train()
    seen = []

    def objective(model, ids, device, window, mtp_loss_weight=None):
        seen.append((model.config.mtp_loss_weight, mtp_loss_weight))
        return language_model_forward(model, ids, device, window, mtp_loss_weight=mtp_loss_weight)

    step = TrainStep(model, build_optimizer(model, TrainConfig()), 1.0, None, torch.device("cpu"), forward=objective)
    result = step([torch.randint(0, config.vocab_size, (2, 16))], lr=0.0, mtp_loss_weight=2.0, bias_update_speed=0.0)
    assert seen == [(0.3, 2.0)]
    assert result.loss == pytest.approx(result.lm_loss + 2.0 * result.mtp_loss + result.balance_loss, rel=1e-5)


def test_parallelize_applies_activation_checkpointing_and_compile_in_one_process():
    from seekmoe.parallel import ParallelConfig, Processes, parallelize
    from seekmoe.parallel.compile import CheckpointedForward

    model = seekmoe.build_model(seekmoe.ModelConfig.preset("tiny")).train()
    assert not any(isinstance(block.forward, CheckpointedForward) for block in model.model.layers)
    parallelize(model, Processes(), ParallelConfig(), activation_checkpointing=True, compile=True)
    assert all(isinstance(block.forward, CheckpointedForward) for block in model.model.layers)
    assert all(block._compiled_call_impl is not None for block in model.model.layers)
    assert all(m.compiled for m in model.modules() if hasattr(m, "compiled"))
