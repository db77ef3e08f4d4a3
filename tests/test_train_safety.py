"""The training loop loses nothing: SIGTERM or Ctrl-C saves a checkpoint and exits non-zero with a way to resume, a
second Ctrl-C aborts, and non-finite gradients behind a finite loss never reach the optimizer."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import seekmoe
from seekmoe import ModelConfig
from seekmoe.train.checkpointing import latest_checkpoint
from seekmoe.train.config import TrainConfig
from seekmoe.train.metrics import read_metrics
from seekmoe.train.optim import build_optimizer
from seekmoe.train.step import TrainStep



def _start(corpus: Path, out: Path, cache: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "seekmoe", "train", "--preset", "tiny", "--out", str(out), "--data", str(corpus),
           "--max-steps", "10000", "--save-every", "5000", "--no-progress", "seq_len=32", "batch_size=2",
           "precision=fp32", "eval_every=5000", f"cache_dir={cache}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_steps(out: Path, proc: subprocess.Popen, steps: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        path = out / "metrics.jsonl"
        if path.is_file() and len(path.read_text().splitlines()) >= steps:
            return
        time.sleep(0.2)
    raise AssertionError(f"training did not reach step {steps}: {proc.stdout.read() if proc.poll() else ''}")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_saves_a_checkpoint_and_exits_nonzero_with_how_to_resume(corpus, tmp_path, signum):
    out = tmp_path / "run"
    proc = _start(corpus, out, tmp_path / "cache")
    _wait_for_steps(out, proc, 3)
    proc.send_signal(signum)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, output
    assert "--resume" in output
    steps = [r["step"] for r in read_metrics(out)]
    newest = latest_checkpoint(out)
    assert newest is not None and int(newest.name.split("-")[1]) == steps[-1] >= 3


def test_a_second_ctrl_c_aborts_at_once(corpus, tmp_path, monkeypatch):
    from seekmoe.train.trainer import StopSignals

    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert signals.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)


def test_non_finite_gradients_with_a_finite_loss_skip_the_step():
    config = ModelConfig.preset("tiny")
    torch.manual_seed(0)
    model = seekmoe.build_model(config).train()
    optimizer = build_optimizer(model, TrainConfig())
    step = TrainStep(model, optimizer, grad_clip=1.0, autocast_dtype=None, device=torch.device("cpu"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    bias = model.moe_layers()[0].gate.e_score_correction_bias.clone()
    hook = model.lm_head.weight.register_hook(lambda g: g * float("inf"))
    ids = [torch.randint(0, 512, (2, 16))]
    result = step(ids, lr=1e-3, mtp_loss_weight=0.3, bias_update_speed=0.1)
    assert result.skipped == "non-finite gradients" and torch.isfinite(torch.tensor(result.loss))
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
        assert p.grad is None
    assert torch.equal(model.moe_layers()[0].gate.e_score_correction_bias, bias)
    hook.remove()
    result = step(ids, lr=1e-3, mtp_loss_weight=0.3, bias_update_speed=0.1)
    assert result.skipped is None
    assert not torch.equal(model.lm_head.weight, before["lm_head.weight"])


def _train(corpus: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["train", "--preset", "tiny", "--out", str(tmp_path / "run"), "--data", str(corpus), "--max-steps", "2",
            "--no-progress", "seq_len=32", "batch_size=2", "precision=fp32", "eval_every=5000", "num_threads=1",
            f"cache_dir={tmp_path / 'cache'}", *extra]


@pytest.mark.parametrize("field, value", [("lr", "inf"), ("lr", "nan"), ("lr", "-1e-3"), ("eps", "inf"),
                                          ("weight_decay", "nan"), ("grad_clip", "inf"), ("beta2", "nan"),
                                          ("val_fraction", "nan")])
def test_non_finite_or_negative_hyperparameters_are_refused_at_config_time(field, value, tmp_path, capsys):
    from seekmoe.cli import main

    with pytest.raises(ValueError, match=f"TrainConfig.{field}=.* is invalid: expected"):
        TrainConfig(**{field: float(value)})
    assert main(_train(tmp_path / "nothing", tmp_path, f"{field}={value}")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"TrainConfig.{field}=" in err[0] and "is invalid: expected" in err[0]
    assert not (tmp_path / "run").exists()


def test_a_run_whose_every_step_is_skipped_says_so_and_exits_nonzero(corpus, tmp_path, monkeypatch, capsys):
    from seekmoe.cli import main
    from seekmoe.train import step

    monkeypatch.setattr(step, "_grad_norm", lambda *args: float("inf"))
    assert main(_train(corpus, tmp_path, "max_bad_steps=5")) == 1
    err = capsys.readouterr().err
    assert "no step completed: all 2 steps were skipped" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "final").exists()  # nothing was trained: no model folder that looks like one


@pytest.mark.parametrize("where", ["checkpoint", "final"])
def test_a_full_disk_is_one_line_and_exit_2(corpus, tmp_path, monkeypatch, capsys, where):
    import errno

    from seekmoe.cli import main
    from seekmoe.model.transformer import CausalLM
    from seekmoe.train.trainer import Trainer

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "x.safetensors"))

    monkeypatch.setattr(Trainer if where == "checkpoint" else CausalLM,
                        "save_checkpoint" if where == "checkpoint" else "save_pretrained", full)
    assert main(_train(corpus, tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"seekmoe train: error: no space left on device writing {tmp_path / 'run' / 'x.safetensors'}: "
                       "free some space, then run the same command with --resume"), err
    assert "Traceback" not in "\n".join(err)
