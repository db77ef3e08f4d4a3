"""`seekmoe rl`: reinforcement learning of a model folder on a task with verifiable rewards, by GRPO.

The run is pretraining's `Trainer` (LR schedule, checkpoints, resume, metrics.jsonl, final/) given `Rollouts` as its
data (sampled by the inference Engine from the policy being trained) and the GRPO objective as its forward.

MoE choices during RL (what this stage decides):
- Routing replay is on by default: the training forward uses the experts each token was sampled with (see
  routing_replay.py); with `routing_replay=false` the share of routing decisions that differ is logged instead.
- The auxiliary-loss-free router biases are frozen (bias_update_speed x 0) unless `bias_update_speed_schedule=` says
  otherwise: a bias step between a rollout and its training forward would change the policy that sampled it, and
  an RL batch (a few prompts of one task) is too narrow a sample of the load to balance on. MaxVio is still logged
  so a user sees the balance drift.
- The balance losses of the model's config stay on at their (small) weights: they act through the gate scores,
  which replay leaves trainable, and keep the router from collapsing onto the experts the task favours.
- The MTP modules are not trained (GRPO scores the sampled tokens only); they are saved unchanged.

Under torchrun (FSDP, expert parallelism) each rank rolls out its share of every step's prompts from a full copy of
the current weights, and the held-out scores are split among the ranks too (rollout.py, rollout_sync.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from .sft import FROZEN_BIAS_SCHEDULE

# Settings of the optimizer and run where they differ from pretraining's: RL moves a trained policy by small steps.
RL_DEFAULTS = dict(lr=1e-4, warmup_steps=0, min_lr_ratio=1.0, max_steps=100, eval_every=10**9, save_every=50,
                   weight_decay=0.0, batch_size=64, bias_update_speed_schedule=FROZEN_BIAS_SCHEDULE)
EVAL_FILE = "eval.json"


def rl(model_dir: str | Path, task_name: str, out: str | Path, overrides: dict | None = None,
       prompts_file: str | Path | None = None, resume: bool | str = False, stop_at: int | None = None,
       progress: bool = True) -> dict:
    """GRPO on `task_name` (built-in, or a Python reward file with `prompts_file`) from the model folder
    `model_dir` into `out`; returns {"before": ..., "after": ...} greedy mean rewards on held-out prompts and the
    run summary."""
    from .. import from_pretrained
    from ..inference.tokenizer import Tokenizer
    from ..train.config import load_run_config
    from ..train.trainer import Trainer
    from .grpo import GRPOConfig
    from .rollout import Rollouts, make_grpo_forward
    from .tasks import load_task

    if not (Path(model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"--model {model_dir}: no config.json (expected a model folder, e.g. a final/)")
    grpo, rest = GRPOConfig.split_overrides(overrides or {})
    task_options = rest.pop("task", {})
    model_config, config = load_run_config(overrides={**RL_DEFAULTS, **rest}, init_from=model_dir)
    if config.activation_checkpointing and grpo.routing_replay:
        raise ValueError("activation_checkpointing=true cannot be combined with routing replay (the recomputed "
                         "forward would route afresh): set one of them off")
    task = load_task(task_name, prompts_file, task_options, grpo.reward_timeout)
    tokenizer = Tokenizer(model_dir, model_config.bos_token_id, model_config.eos_token_id)
    rollouts: Rollouts | None = None

    def make_data(hf_tokenizer, rank: int, world_size: int):
        nonlocal rollouts
        rollouts = Rollouts(task, tokenizer, config, grpo, hf_tokenizer, rank, world_size)
        return rollouts

    trainer = Trainer(model_config, config, out, resume=resume, stop_at=stop_at, progress=progress,
                      init_from=model_dir, make_data=make_data, forward=make_grpo_forward(grpo))
    reference = None
    if grpo.beta > 0:  # the frozen policy the KL penalty holds the model near (none is kept when beta = 0)
        reference = from_pretrained(model_dir, dtype=next(trainer.model.parameters()).dtype, device=trainer.device)
        reference.eval().requires_grad_(False)
    rollouts.bind(trainer.model, trainer.device, reference, trainer.reduce)
    held_out = task.prompts(grpo.eval_prompts, seed=-1 - config.seed)  # never a training rollout's seed
    eval_path = Path(out) / EVAL_FILE
    scores = json.loads(eval_path.read_text()) if resume and eval_path.is_file() else {}
    if "before" not in scores:
        scores["before"] = rollouts.score(held_out, grpo.max_new_tokens)
        if trainer.rank == 0:
            eval_path.parent.mkdir(parents=True, exist_ok=True)
            eval_path.write_text(json.dumps(scores, indent=2) + "\n")
    trainer.log(f"held-out mean reward before GRPO: {scores['before']:.3f} ({len(held_out)} prompts, greedy)")
    summary = trainer.run()
    if "stopped_at" in summary:
        return {**scores, "summary": summary}
    scores["after"] = rollouts.score(held_out, grpo.max_new_tokens)
    if trainer.rank == 0:
        eval_path.write_text(json.dumps(scores, indent=2) + "\n")
        plot_rl(Path(out))
    trainer.log(f"held-out mean reward: {scores['before']:.3f} before, {scores['after']:.3f} after GRPO")
    return {**scores, "summary": summary}


def plot_rl(out: Path) -> Path | None:
    """`OUT/plots/rl.png`: reward mean/std, KL, clip fraction, completion length and MaxVio over steps."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from ..train.metrics import read_metrics

    records = read_metrics(out)
    panels = [("reward", ("reward_mean", "reward_std")), ("KL to reference", ("kl",)),
              ("clip fraction", ("clip_fraction",)), ("completion length (tokens)", ("completion_length",)),
              ("MaxVio", ("max_vio",)), ("routing mismatch (replay off)", ("routing_mismatch",))]
    panels = [(t, keys) for t, keys in panels if any(k in r for r in records for k in keys)]
    if not panels:
        return None
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.2 * len(panels)), sharex=True, squeeze=False)
    for ax, (title, keys) in zip(axes[:, 0], panels):
        for key in keys:
            points = [(r["step"], r[key]) for r in records if key in r]
            ax.plot([p[0] for p in points], [p[1] for p in points], label=key, linewidth=1)
        ax.set_ylabel(title)
        ax.legend(loc="best")
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    path = out / "plots" / "rl.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
