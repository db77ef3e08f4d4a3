"""`seekmoe sft`: supervised fine-tuning of a model folder on chats or prompt/completion pairs.

The run is pretraining's `Trainer` (LR schedule, balancing, checkpoints, exact resume, metrics.jsonl, plots,
final/) given `SFTData` for its data and `sft_forward` for its objective: loss on the assistant's tokens only, several
examples packed per sequence without attention across them. Router biases keep moving by the auxiliary-loss-free
rule unless `--freeze-router-bias`, and the balance losses of the model's config stay on.
"""

from __future__ import annotations

import argparse
from pathlib import Path

# SFT's settings where they differ from pretraining's: a lower, briefly warmed-up lr (the model already knows the
# language), and the evaluation/checkpoint rhythm of a short run. field=value overrides every one.
SFT_DEFAULTS = dict(lr=3e-4, warmup_steps=10, max_steps=300, eval_every=50, save_every=100, seq_len=256,
                    batch_size=8, val_fraction=0.05)
FROZEN_BIAS_SCHEDULE = [[0.0, 0.0]]  # bias_update_speed x 0 for the whole run


def sft(model_dir: str | Path, data: list[str | Path], out: str | Path, overrides: dict | None = None,
        resume: bool | str = False, stop_at: int | None = None, progress: bool = True,
        freeze_router_bias: bool = False) -> dict:
    """Fine-tune the model folder `model_dir` on the JSONL files `data` into `out`; returns the run summary."""
    from ..inference.tokenizer import Tokenizer
    from ..train.config import load_run_config
    from ..train.trainer import Trainer
    from .sft_data import SFTData, sft_forward

    if not (Path(model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"--model {model_dir}: no config.json (expected a model folder, e.g. a final/)")
    settings = {**SFT_DEFAULTS, **(overrides or {})}
    if freeze_router_bias:
        settings["bias_update_speed_schedule"] = FROZEN_BIAS_SCHEDULE
    model_config, config = load_run_config(overrides=settings, init_from=model_dir)
    tokenizer = Tokenizer(model_dir, model_config.bos_token_id, model_config.eos_token_id)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"--model {model_dir}: the tokenizer has no end-of-text token to end assistant turns with")
    trainer = Trainer(model_config, config, out, resume=resume, stop_at=stop_at, progress=progress,
                      init_from=model_dir, make_data=lambda hf, rank, size: SFTData(data, tokenizer, config, hf, rank, size),
                      forward=sft_forward)
    return trainer.run()


def add_sft_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the `sft` command's options."""
    from ..train.cli import add_resume_arguments

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "data: JSONL, one record a line, either\n"
        '  {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}  (every assistant turn trained)\n'
        '  {"prompt": "...", "completion": "..."}  (the prompt is one user turn)\n'
        "rendered with the model's chat template (as `seekmoe chat` prompts it); only the assistant's tokens and the\n"
        "end-of-text after each are trained. Examples are packed several a sequence (seq_len=), each attending only\n"
        f"to itself. Defaults that differ from `seekmoe train`: {SFT_DEFAULTS}.\n"
        "Writes OUT/metrics.jsonl, OUT/checkpoints/ (resume with --resume), OUT/plots/ and OUT/final/ (a model folder).")
    parser.add_argument("--model", required=True, metavar="DIR", help="the model folder to fine-tune (a final/)")
    parser.add_argument("--data", required=True, nargs="+", metavar="FILE", help="JSONL files of chats or "
                                                                               "prompt/completion pairs")
    parser.add_argument("--out", required=True, metavar="DIR", help="where metrics, checkpoints and final/ go")
    parser.add_argument("--max-steps", type=int, metavar="N", help=f"optimizer steps (default "
                                                                  f"{SFT_DEFAULTS['max_steps']})")
    parser.add_argument("--freeze-router-bias", action="store_true",
                        help="keep the routers' balancing biases as the model has them (no auxiliary-loss-free "
                             "bias updates); the balance losses of the model's config still apply")
    parser.add_argument("--stop-at", type=int, metavar="N", help="end after step N with a checkpoint; --resume "
                                                                 "continues")
    add_resume_arguments(parser)
    parser.add_argument("--seed", type=int, metavar="S", help="seed of the held-out split and data order")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", metavar="field=value",
                        help="any TrainConfig field (lr=1e-4 seq_len=512 batch_size=16 ...), or a ModelConfig field "
                             "no weight depends on")


def run_sft(args: argparse.Namespace) -> int:
    """Run `seekmoe sft`; returns the exit status."""
    from ..train.config import parse_overrides
    from ..train.cli import resume_mode
    from ..train.trainer import exit_status

    # `--data a.jsonl lr=1e-3`: argparse hands the override to --data; a field=value that is no file is one.
    data = [p for p in args.data if "=" not in p or Path(p).exists()]
    overrides = parse_overrides([p for p in args.data if p not in data] + args.overrides)
    for flag in ("max_steps", "seed"):
        if getattr(args, flag) is not None:
            overrides[flag] = getattr(args, flag)
    return exit_status("sft", lambda: sft(args.model, data, args.out, overrides, resume=resume_mode(args),
                                          stop_at=args.stop_at, progress=not args.no_progress,
                                          freeze_router_bias=args.freeze_router_bias))
