"""The post-training commands: `seekmoe sft` (supervised fine-tuning on chats or prompt/completion pairs) and
`seekmoe rl` (GRPO on a task with verifiable rewards)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .rl import RL_DEFAULTS, rl
from .sft import SFT_DEFAULTS, sft


def add_sft_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the `sft` command's options."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "data: JSONL, one record a line, either\n"
        '  {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}  (every assistant turn trained)\n'
        '  {"prompt": "...", "completion": "..."}  (the prompt is one user turn)\n'
        "rendered with the model's chat template (as `seekmoe chat` prompts it); only the assistant's tokens and the\n"
        "end-of-text after each are trained. Examples are packed several a sequence (seq_len=), each attending only\n"
        f"to itself. Defaults that differ from `seekmoe train`: {SFT_DEFAULTS}.\n"
        "Writes OUT/metrics.jsonl, OUT/checkpoints/ (resume with --resume), OUT/plots/ and OUT/final/ (a model folder).\n"
        "images: with --vision-tower (or a vision-language --model), a user turn's content may be a list of parts\n"
        '  [{"type": "text", "text": "..."},\n'
        '   {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}]\n'
        "(PNG, JPEG or WebP; file:///... URLs only under --image-dir; http(s) never fetched). LLaVA's stages: first\n"
        "--stage align (the projector alone), then --stage full on its final/ (projector and language model).")
    parser.add_argument("--model", required=True, metavar="DIR", help="the model folder to fine-tune (a final/)")
    parser.add_argument("--data", required=True, nargs="+", metavar="FILE", help="JSONL files of chats or "
                                                                               "prompt/completion pairs")
    parser.add_argument("--freeze-router-bias", action="store_true",
                        help="keep the routers' balancing biases as the model has them (no auxiliary-loss-free "
                             "bias updates); the balance losses of the model's config still apply")
    parser.add_argument("--vision-tower", metavar="tiny|small|DIR",
                        help="attach a fresh vision tower and projector to the (text) model: a preset, or a "
                             "Kimi-K2.5 folder whose tower to copy; the final/ is then a kimi_k25 folder")
    parser.add_argument("--stage", choices=["align", "full"], default="full",
                        help="vision-language training stage: align = the projector alone (LLaVA stage 1), full = "
                             "projector and language model (stage 2; default)")
    parser.add_argument("--train-vision-tower", action="store_true",
                        help="train the vision tower too (frozen by default)")
    parser.add_argument("--image-dir", metavar="DIR",
                        help="the folder file:// image URLs may point into (default: the first --data file's)")
    _add_run_arguments(parser, SFT_DEFAULTS["max_steps"], "seed of the held-out split and data order", quantize=True)
    parser.add_argument("overrides", nargs="*", metavar="field=value",
                        help="any TrainConfig field (lr=1e-4 seq_len=512 batch_size=16 ...), or a ModelConfig field "
                             "no weight depends on")


def run_sft(args: argparse.Namespace) -> int:
    """Run `seekmoe sft`; returns the exit status."""
    from ..train.cli import resume_mode
    from ..train.trainer import exit_status

    # `--data a.jsonl lr=1e-3`: argparse hands the override to --data; a field=value that is no file is one.
    data = [p for p in args.data if "=" not in p or Path(p).exists()]
    overrides = _run_overrides(args, [p for p in args.data if p not in data] + args.overrides)
    return exit_status("sft", lambda: sft(args.model, data, args.out, overrides, resume=resume_mode(args),
                                          stop_at=args.stop_at, progress=not args.no_progress,
                                          freeze_router_bias=args.freeze_router_bias,
                                          vision_tower=args.vision_tower, stage=args.stage,
                                          train_vision_tower=args.train_vision_tower, image_dir=args.image_dir))


def add_rl_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the `rl` command's options."""
    from .grpo import GRPOConfig
    from .tasks import BUILTIN_TASKS

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "GRPO settings (field=value; defaults in brackets):\n"
        + "".join(f"  {k}={v}\n" for k, v in GRPOConfig().to_dict().items())
        + "  (num_generations: G completions a prompt; beta: KL weight, 0 = no reference model; epsilon_high: DAPO's\n"
        "   clip-higher; loss_type: grpo | dapo | dr_grpo as TRL names them; routing_replay: train on the rollout's\n"
        "   experts)\n"
        f"Run settings that differ from `seekmoe train`: {RL_DEFAULTS} (router biases frozen; any TrainConfig\n"
        "field=value overrides them, batch_size = completions per micro-batch of each process).\n"
        "Writes OUT/metrics.jsonl (reward_mean, reward_std, kl, clip_fraction, completion_length, max_vio, ... a step),\n"
        "OUT/eval.json (held-out greedy mean reward before and after), OUT/plots/rl.png, OUT/checkpoints/, OUT/final/.\n"
        "Under torchrun (`torchrun --nproc-per-node N -m seekmoe rl ...`, parallel.ep=E) each process samples\n"
        "prompts_per_step / N of a step's prompts (a multiple of N) from a full copy of the current weights, with the\n"
        "seeds one process uses: the same weights sample the same completions at any N.\n"
        f"Built-in tasks: {', '.join(sorted(BUILTIN_TASKS))} (seeded; options as task.NAME=VALUE: arithmetic\n"
        "task.terms=3 task.max_value=9, reverse task.min_len=3 task.max_len=5 task.alphabet=abcdefgh); a user task is a Python file defining\n"
        "reward(prompt: str, completion: str) -> float, with --prompts FILE.jsonl of {\"prompt\": \"...\"} lines.")
    parser.add_argument("--model", required=True, metavar="DIR", help="the model folder to train (e.g. an SFT final/)")
    parser.add_argument("--task", required=True, metavar="TASK",
                        help=f"a built-in task ({', '.join(sorted(BUILTIN_TASKS))}) or a Python file of reward()")
    parser.add_argument("--prompts", metavar="FILE", help="JSONL prompts of a user task")
    _add_run_arguments(parser, RL_DEFAULTS["max_steps"], "seed of the rollouts' prompts and sampling")
    parser.add_argument("overrides", nargs="*", metavar="field=value",
                        help="GRPO settings (below) and TrainConfig fields, e.g. beta=0.04 num_generations=8 lr=1e-5")


def run_rl(args: argparse.Namespace) -> int:
    """Run `seekmoe rl`; returns the exit status."""
    from ..train.cli import resume_mode
    from ..train.trainer import exit_status

    overrides = _run_overrides(args, args.overrides)
    return exit_status("rl", lambda: rl(args.model, args.task, args.out, overrides, prompts_file=args.prompts,
                                        resume=resume_mode(args), stop_at=args.stop_at, progress=not args.no_progress))


def _add_run_arguments(parser: argparse.ArgumentParser, max_steps: int, seed_help: str,
                       quantize: bool = False) -> None:
    """The options sft and rl share with each other: where the run goes, how long, resuming, seed, progress, LoRA
    (and QLoRA's --quantize where `quantize`)."""
    from ..lora.cli import add_lora_arguments
    from ..train.cli import add_resume_arguments

    parser.add_argument("--out", required=True, metavar="DIR", help="where metrics, checkpoints and final/ go")
    parser.add_argument("--max-steps", type=int, metavar="N", help=f"optimizer steps (default {max_steps})")
    parser.add_argument("--stop-at", type=int, metavar="N", help="end after step N with a checkpoint; --resume "
                                                                 "continues")
    add_resume_arguments(parser)
    parser.add_argument("--seed", type=int, metavar="S", help=seed_help)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_lora_arguments(parser, quantize=quantize)


def _run_overrides(args: argparse.Namespace, items: list[str]) -> dict:
    """The field=value overrides, with --max-steps and --seed among them when given."""
    from ..train.config import parse_overrides

    from ..lora.cli import lora_overrides

    overrides = parse_overrides(items)
    for flag in ("max_steps", "seed"):
        if getattr(args, flag) is not None:
            overrides[flag] = getattr(args, flag)
    lora = lora_overrides(args)
    if lora is not None:
        overrides["lora"] = {**overrides.get("lora", {}), **lora}
    return overrides
