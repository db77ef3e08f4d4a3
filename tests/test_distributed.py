"""Training under torchrun on CPU (gloo): expert parallelism and FSDP2 reproduce one process exactly, runs resume
with another number of processes, and a killed rank ends the job with a checkpoint to resume from.

Each check starts 2 or 4 processes with `python -m torch.distributed.run` running tests/distributed_worker.py."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from seekmoe.train import load_run_config
from seekmoe.train.checkpointing import latest_checkpoint
from seekmoe.train.metrics import read_metrics
from seekmoe.train.trainer import Trainer

WORKER = str(Path(__file__).parent / "distributed_worker.py")
STEPS = 20


def torchrun(nproc: int, *args: str, timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return done




def settings(cache: str, per_rank_batch: int, **extra) -> dict:
    """Tiny training whose global batch is 4 sequences of 32 tokens at any number of processes."""
    return {"seq_len": 32, "batch_size": per_rank_batch, "max_steps": STEPS, "warmup_steps": 2, "eval_every": 10,
            "save_every": 5, "eval_batches": 1, "cache_dir": cache, "precision": "fp32", "lr": 3e-3,
            "bias_update_speed": 0.01, "aux_loss_alpha": 0.001, "keep_checkpoints": 5, **extra}


def one_process(out: Path, corpus: Path, cache: str, resume: bool = False, stop_at: int | None = None,
                overrides: dict | None = None) -> None:
    overrides = dict(overrides or settings(cache, 4))
    init_from = overrides.pop("init_from", None)
    model_config, config = load_run_config(None if init_from else "tiny", overrides=overrides, init_from=init_from)
    Trainer(model_config, config, out, data=[str(corpus)], resume=resume, stop_at=stop_at, progress=False,
            init_from=init_from).run()


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out)]


@pytest.fixture(scope="module")
def reference(corpus, cache, tmp_path_factory) -> list[float]:
    """The losses of an uninterrupted single-process run."""
    out = tmp_path_factory.mktemp("reference")
    one_process(out, corpus, cache)
    return losses(out)


def assert_same_losses(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want)
    for step, (a, b) in enumerate(zip(got, want), start=1):
        assert abs(a - b) <= 1e-4 * abs(b), f"step {step}: {a} vs {b}"


@pytest.mark.parametrize("nproc,ep", [(2, 2), (4, 4), (4, 2)])
def test_expert_parallel_forward_and_backward_equal_one_process(nproc, ep):
    torchrun(nproc, WORKER, "grads", str(ep))


def test_routers_stay_fp32_under_fsdp_bf16_mixed_precision():
    torchrun(2, WORKER, "mixed", "2")


@pytest.mark.parametrize("nproc,ep", [(2, 1), (4, 2)])
def test_sharded_training_reproduces_one_process_losses_and_identical_biases(corpus, cache, reference, tmp_path,
                                                                             nproc, ep):
    overrides = settings(cache, 4 // nproc, parallel={"ep": ep})
    torchrun(nproc, WORKER, "train", str(tmp_path), str(corpus), json.dumps(overrides))
    assert_same_losses(losses(tmp_path), reference)
    assert (tmp_path / "final" / "model.safetensors").is_file()


def test_stop_with_two_processes_resume_with_one_and_the_reverse(corpus, cache, reference, tmp_path):
    two_then_one = tmp_path / "two_then_one"
    torchrun(2, WORKER, "train", str(two_then_one), str(corpus),
             json.dumps({**settings(cache, 2, parallel={"ep": 2}), "stop_at": 10}))
    one_process(two_then_one, corpus, cache, resume=True)
    assert_same_losses(losses(two_then_one), reference)

    one_then_two = tmp_path / "one_then_two"
    one_process(one_then_two, corpus, cache, stop_at=10)
    torchrun(2, WORKER, "train", str(one_then_two), str(corpus), json.dumps(settings(cache, 2, parallel={"ep": 2})))
    assert_same_losses(losses(one_then_two), reference)


def test_grow_training_new_experts_under_ep2_and_fsdp2_reproduces_one_process(corpus, cache, tmp_path):
    """`--train new-experts,router` composes with expert parallelism and FSDP: the losses equal one process's and
    the frozen experts stay bit-identical (the trainable rows are a weight provider over the sharded experts)."""
    import torch

    from seekmoe import from_pretrained
    from seekmoe.cli import main
    from seekmoe.grow import GrowRecord

    base = settings(cache, 4, max_steps=2, save_every=2)
    one_process(tmp_path / "pre", corpus, cache, overrides=base)
    assert main(["expand", "--model", str(tmp_path / "pre" / "final"), "--add-experts", "4", "--init", "zero",
                 "--out", str(tmp_path / "grown")]) == 0
    grow = {**settings(cache, 4, max_steps=4, save_every=4, eval_every=100), "trainable": "new-experts,router",
            "new_expert_bias_update_speed": 0.5, "new_expert_onboarding_steps": 4, "init_from": str(tmp_path / "grown")}
    one_process(tmp_path / "one", corpus, cache, overrides=grow)
    want = losses(tmp_path / "one")
    before = from_pretrained(tmp_path / "grown").state_dict()
    new = GrowRecord.of(from_pretrained(tmp_path / "grown").config).new
    for name, ep in (("ep2", 2), ("dp2", 1)):
        out = tmp_path / name
        torchrun(2, WORKER, "train", str(out), str(corpus), json.dumps({**grow, "batch_size": 2,
                                                                        "parallel": {"ep": ep}}))
        assert_same_losses(losses(out), want)
        after = from_pretrained(out / "final").state_dict()
        for layer, ids in new.items():
            for tensor in ("gate_up_proj", "down_proj"):
                key = f"{layer}.experts.{tensor}"
                frozen = [e for e in range(before[key].shape[0]) if e not in ids]
                assert torch.equal(before[key][frozen], after[key][frozen]), (name, key)
                assert not torch.equal(before[key][ids], after[key][ids]), (name, key, "the new experts trained")
    # Stopped under expert parallelism, resumed in one process: the trainable rows come back from the checkpoint.
    cut = tmp_path / "ep2_then_one"
    torchrun(2, WORKER, "train", str(cut), str(corpus), json.dumps({**grow, "batch_size": 2, "parallel": {"ep": 2},
                                                                     "stop_at": 2}))
    one_process(cut, corpus, cache, resume=True, overrides=grow)
    assert_same_losses(losses(cut), want)


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def test_a_killed_rank_ends_the_job_and_resume_continues_from_the_last_checkpoint(corpus, cache, tmp_path):
    overrides = settings(cache, 2, max_steps=400, save_every=3)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", WORKER, "train",
           str(tmp_path), str(corpus), json.dumps(overrides)]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "checkpoints" / "step-00000006").is_dir():
        time.sleep(0.2)
    workers = _children(proc.pid)
    assert workers, "no worker processes found"
    os.kill(workers[-1], signal.SIGKILL)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "Signals.SIGKILL" in output or "exitcode  : -9" in output, output[-3000:]
    newest = latest_checkpoint(tmp_path)
    assert newest is not None
    saved = int(newest.name.split("-")[1])
    model_config, config = load_run_config("tiny", overrides={**settings(cache, 4), "max_steps": saved + 2})
    trainer = Trainer(model_config, config, tmp_path, data=[str(corpus)], resume=True, progress=False)
    assert trainer.start_step == saved
    trainer.run()
    assert read_metrics(tmp_path)[-1]["step"] == saved + 2


def test_a_stored_old_format_checkpoint_resumes_under_two_processes(tmp_path):
    """The single-process format seekmoe wrote before DCP (tests/data/legacy_checkpoint) resumes sharded over EP=2."""
    import shutil

    from test_checkpoints import LEGACY, LEGACY_OVERRIDES, _legacy_corpus

    run = tmp_path / "run"
    shutil.copytree(LEGACY, run, ignore=shutil.ignore_patterns("make.py", "uninterrupted.json"))
    corpus = _legacy_corpus(tmp_path / "corpus")
    overrides = {**LEGACY_OVERRIDES, "batch_size": 1, "cache_dir": str(tmp_path / "cache"), "parallel": {"ep": 2}}
    torchrun(2, WORKER, "train", str(run), str(corpus), json.dumps(overrides))
    want = json.loads((LEGACY / "uninterrupted.json").read_text())["losses"]
    assert_same_losses(losses(run), want)
