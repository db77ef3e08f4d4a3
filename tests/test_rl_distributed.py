"""`seekmoe rl` under torchrun (gloo, CPU): rollouts split among ranks reproduce one process's run step for step.

Each rank samples its slice of a step's prompts with the seeds one process uses, from a full copy of the current
weights, so with the same weights a 2-process run samples exactly the completions one process samples; the loss's
divisor and the logged figures are summed over ranks. The single-process run's micro-batches (batch_size = a rank's
completions) are the ranks' ones, so even the per-micro-batch balance loss matches."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from seekmoe.cli import main
from seekmoe.posttrain.demo import make_base_model
from seekmoe.posttrain.rollout_sync import rank_slice
from seekmoe.train.metrics import read_metrics

COMPARED = ("loss", "lm_loss", "balance_loss", "grad_norm", "reward_mean", "reward_std", "completion_length",
            "groups_without_signal", "clip_fraction", "kl")
SAMPLED = ("reward_mean", "reward_std", "completion_length", "groups_without_signal")
# A reward that varies with what a random policy writes, so the advantages (and the loss) are not all zero.
REWARD = "def reward(prompt, completion):\n    return float(sum(map(ord, completion)) % 5) / 4\n"
PROMPTS = ["Compute 1 + 2.", "Reverse the letters: abc", "hello there", "what is 3 - 1?"]


@pytest.fixture(scope="module", autouse=True)
def keep_thread_count():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def rl_setup(tmp_path_factory):
    """A freshly initialized tiny model folder and a user task whose reward varies with random completions."""
    folder = tmp_path_factory.mktemp("rlpar")
    texts = [f"User: {p}\nAssistant: {i}" for i, p in enumerate(PROMPTS * 20)]
    model_dir = make_base_model(folder / "base", texts)
    (folder / "task.py").write_text(REWARD)
    (folder / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return folder, model_dir


def rl_args(folder, model_dir, out, *extra: str) -> list[str]:
    # 2 prompts x 4 completions a step; batch_size 4 = one rank's completions at 2 processes. num_iterations=2:
    # steps 1-2 train on rollout 0 (the second one clips against the sampling policy), step 3 samples from the
    # weights after two updates.
    return ["rl", "--model", str(model_dir), "--task", str(folder / "task.py"), "--prompts",
            str(folder / "prompts.jsonl"), "--out", str(out), "--max-steps", "3", "--no-progress",
            "prompts_per_step=2", "num_generations=4", "max_new_tokens=6", "eval_prompts=3", "batch_size=4",
            "lr=1e-2", "beta=0.04", "num_iterations=2", "precision=fp32", "num_threads=1", "save_every=100", *extra]


def torchrun_rl(nproc: int, args: list[str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m",
           "seekmoe", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout[-3000:]}\n" \
                                 f"{done.stderr[-6000:]}"


@pytest.fixture(scope="module")
def one_process(rl_setup):
    folder, model_dir = rl_setup
    out = folder / "one"
    assert main(rl_args(folder, model_dir, out)) == 0
    return out


@pytest.mark.parametrize("ep", [1, 2], ids=["fsdp-dp2", "ep2"])
def test_rl_at_two_processes_reproduces_one_process_step_for_step(rl_setup, one_process, ep):
    folder, model_dir = rl_setup
    out = folder / f"two-ep{ep}"
    torchrun_rl(2, rl_args(folder, model_dir, out, f"parallel.ep={ep}"))
    want, got = read_metrics(one_process), read_metrics(out)
    assert len(got) == len(want) == 3
    assert any(r["loss"] != 0 for r in want) and any(r["reward_std"] > 0 for r in want)  # a real signal
    for step, (a, b) in enumerate(zip(got, want), start=1):
        # The same completions: their rewards and lengths are one process's exactly.
        assert [a[k] for k in SAMPLED] == [b[k] for k in SAMPLED], step
        for key in COMPARED:
            assert abs(a[key] - b[key]) <= 1e-4 * abs(b[key]) + 1e-8, (step, key, a[key], b[key])
    assert json.loads((out / "eval.json").read_text()) == pytest.approx(
        json.loads((one_process / "eval.json").read_text()), abs=1e-6)
    assert (out / "final" / "config.json").is_file()


def test_rl_stopped_at_two_processes_resumes_in_one_exactly(rl_setup, one_process):
    folder, model_dir = rl_setup
    out = folder / "two-then-one"
    torchrun_rl(2, rl_args(folder, model_dir, out, "--stop-at", "2"))
    assert main(rl_args(folder, model_dir, out, "--resume")) == 0
    want, got = read_metrics(one_process), read_metrics(out)
    assert [r["rollout"] for r in got] == [0, 0, 1]
    for key in COMPARED:
        assert abs(got[-1][key] - want[-1][key]) <= 1e-4 * abs(want[-1][key]) + 1e-8, (key, got[-1], want[-1])


def test_prompts_that_do_not_split_among_ranks_are_refused_by_name():
    assert rank_slice(8, 1, 2, "prompts_per_step") == range(4, 8)
    with pytest.raises(ValueError, match=r"prompts_per_step=3 does not split among 2 processes: expected a "
                                         r"multiple of 2"):
        rank_slice(3, 0, 2, "prompts_per_step")
