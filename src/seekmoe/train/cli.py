"""`seekmoe train`: pretrain a DeepSeek-style MoE model on text, resumably."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import PRESETS
from ..lora.cli import add_lora_arguments, lora_overrides


EPILOG = """\
several processes (one per GPU, or a few CPU processes) are launched by torchrun:
  torchrun --nproc-per-node 8 -m seekmoe train --preset P --out DIR parallel.ep=8
  torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m seekmoe train ...
Every process reads its own share of each global batch (batch_size x grad_accum x processes sequences); parameters
are sharded with FSDP2 and the routed experts split over parallel.ep processes. Settings:
  parallel.ep=E              expert-parallel size, dividing the number of processes and n_routed_experts
  parallel.node_limit=M      check that each token's experts lie on at most M EP ranks (node-limited routing)
  parallel.mixed_precision=  FSDP2 bf16 compute with fp32 gradient reduction (default: on CUDA)
  parallel.reshard_after_forward=false   keep gathered parameters between forward and backward (more memory)
Checkpoints (OUT/checkpoints/step-N/) are in torch.distributed.checkpoint format at any number of processes, one
included, and resume at any other number; final/ is one Hugging Face model folder, and so is OUT/hf/step-N/ every
--save-hf-every N steps. `seekmoe export --checkpoint OUT --out DIR` turns a checkpoint into a model folder.
"""


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the `train` command's options."""
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--preset", choices=sorted(PRESETS), help="a named model with its training settings")
    model.add_argument("--config", metavar="FILE", help="a YAML or TOML file of config fields (and 'preset:')")
    model.add_argument("--init-from", metavar="DIR",
                       help="start from the weights and router biases of a model folder (a final/ of an earlier "
                            "run, or a DeepSeek checkpoint); its config.json is the model, field=value may change "
                            "settings that no weight depends on")
    parser.add_argument("--out", required=True, metavar="DIR", help="where metrics, checkpoints and final/ go")
    parser.add_argument("--data", nargs="+", metavar="PATH",
                        help="text files, folders (see data_glob=), .jsonl ('text' field) or .parquet files; "
                             "default: the Python standard library's source")
    parser.add_argument("--max-steps", type=int, metavar="N", help="optimizer steps the schedules span (default: the preset's, 1000 unless it says otherwise)")
    parser.add_argument("--save-every", type=int, metavar="N", help="checkpoint every N steps (default: the preset's, else 500), and always at the end")
    parser.add_argument("--eval-every", type=int, metavar="N", help="validation loss every N steps (default: the preset's, else 100)")
    parser.add_argument("--stop-at", type=int, metavar="N", help="end after step N with a checkpoint (as if "
                                                                 "pre-empted); --resume continues")
    parser.add_argument("--seed", type=int, metavar="S", help="seed of initialization and data order (default 0); "
                                                              "the same seed repeats a run exactly on CPU in fp32")
    parser.add_argument("--extend-context", type=int, metavar="LEN",
                        help="with --init-from: a context-extension stage (DeepSeek-V3 section 4.3) that sets YaRN "
                             "from the model's original context to LEN tokens and trains on LEN-token sequences of "
                             "long documents at a constant lr (defaults: seq_len=LEN, lr = the final lr of a default "
                             "pretraining run, warmup_steps=0, min_file_bytes=4*LEN; field=value overrides them)")
    parser.add_argument("--dsa-stage", choices=("warmup", "sparse"),
                        help="with --init-from a DeepSeek-V3.2 model (index_topk set): one of the report's two "
                             "stages of training its sparse attention. warmup: dense attention, only the lightning "
                             "indexers train, towards the main attention's distribution (KL; lr 1e-3 constant); "
                             "sparse: attention over the indexer's top-k, the model trained by the language-model "
                             "loss and the indexer by its KL alone (lr = the final lr of a default pretraining run, "
                             "constant). field=value overrides these defaults; the KL is logged as indexer_kl. "
                             "Training a V3.2 model without this flag uses the sparse stage's objective")
    parser.add_argument("--train", metavar="WHAT",
                        help="which parameters train, the rest frozen (no gradients, no optimizer state): 'all' "
                             "(default), or comma-separated names (new-experts, router, experts, shared-experts, "
                             "attention, dense-mlp, embeddings, norms, mtp) and globs of parameter names, e.g. "
                             "--train new-experts,router after `seekmoe expand` (sets trainable=)")
    add_resume_arguments(parser)
    add_lora_arguments(parser)
    parser.add_argument("--save-hf-every", type=int, metavar="N",
                        help="also write a Hugging Face model folder DIR/hf/step-N/ every N steps (save_hf_every=)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", metavar="field=value",
                        help="set any ModelConfig or TrainConfig field, e.g. num_nextn_predict_layers=1 lr=1e-3 "
                             "optimizer=muon")


def add_resume_arguments(parser: argparse.ArgumentParser) -> None:
    """--resume and --resume-or-start, shared by every command that trains (train, sft, rl)."""
    resume = parser.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true",
                        help="continue from the newest intact checkpoint in OUT (a new or empty OUT starts at step "
                             "0); refuses, changing nothing, when OUT holds a run but no intact checkpoint")
    resume.add_argument("--resume-or-start", action="store_true",
                        help="as --resume, but when OUT holds a run with no intact checkpoint, move that run to "
                             "OUT/previous-run-TIME/ and start from step 0")


def resume_mode(args: argparse.Namespace) -> bool | str:
    """The Trainer's `resume` for the flags add_resume_arguments registered."""
    return "or-start" if args.resume_or_start else args.resume


def run_train(args: argparse.Namespace) -> int:
    """Run `seekmoe train`; returns the exit status."""
    from .config import load_run_config, parse_overrides
    from .indexer_warmup import indexer_objective
    from .trainer import exit_status, train

    # `--data a.txt lr=1e-3`: argparse hands the override to --data; a field=value that is no path is an override.
    data = [p for p in args.data or [] if "=" not in p or Path(p).exists()] or None
    overrides = parse_overrides([p for p in args.data or [] if p not in (data or [])] + args.overrides)
    if args.train is not None:
        overrides["trainable"] = args.train
    lora = lora_overrides(args)
    if lora is not None:
        overrides["lora"] = {**overrides.get("lora", {}), **lora}
    for flag in ("max_steps", "save_every", "eval_every", "seed", "save_hf_every"):
        if getattr(args, flag) is not None:
            overrides[flag] = getattr(args, flag)
    if args.dsa_stage is not None:
        overrides = {**dsa_stage_defaults(args.dsa_stage, args.init_from), **overrides}
    model_config, train_config = load_run_config(args.preset, args.config, overrides, init_from=args.init_from,
                                                 extend_context=args.extend_context)
    forward = None
    # V3.2: the indexer learns beside the model (train/indexer_warmup.py); V4's CSA indexer trains with the model
    if model_config.index_topk is not None and not model_config.is_v4:
        forward = indexer_objective(args.dsa_stage or "sparse")
    elif args.dsa_stage is not None:
        raise ValueError(f"--dsa-stage {args.dsa_stage} needs a model with sparse attention: "
                         f"{args.init_from}/config.json sets no index_topk (a DeepSeek-V3.2 model has one)")
    resume = resume_mode(args)
    return exit_status("train", lambda: train(model_config, train_config, args.out, data=data, resume=resume,
                                              stop_at=args.stop_at, progress=not args.no_progress,
                                              init_from=args.init_from, forward=forward))


def dsa_stage_defaults(stage: str, init_from: str | None) -> dict:
    """The training defaults of a `--dsa-stage` (train/indexer_warmup.py); it continues a model (`--init-from`)."""
    from .config import TrainConfig
    from .indexer_warmup import stage_defaults

    if init_from is None:
        raise ValueError(f"--dsa-stage {stage} needs --init-from DIR: it continues a trained DeepSeek-V3.2 model")
    return stage_defaults(stage, TrainConfig.lr * TrainConfig.min_lr_ratio)


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the `export` command's options."""
    parser.add_argument("--format", choices=("hf", "gguf"), default="hf",
                        help="hf (default): a training checkpoint into a Hugging Face model folder; gguf: a model "
                             "folder into one GGUF file for llama.cpp, Ollama and LM Studio (needs `pip install gguf`)")
    parser.add_argument("--checkpoint", metavar="DIR",
                        help="(hf) a training checkpoint folder (OUT/checkpoints/step-N), or a run's OUT folder for "
                             "its newest intact checkpoint")
    parser.add_argument("--model", metavar="DIR", help="(gguf) a model folder: config.json, safetensors, tokenizer.json")
    parser.add_argument("--outtype", default="bf16", metavar="TYPE",
                        help="(gguf) weight type: f32, f16, bf16 (default) or q8_0; norms, biases and the router "
                             "stay f32")
    parser.add_argument("--out", required=True, metavar="PATH",
                        help="the new model folder to write (hf), or the .gguf file (gguf)")


def run_export(args: argparse.Namespace) -> int:
    """Run `seekmoe export`; returns the exit status."""
    if args.format == "gguf":
        if args.model is None or args.checkpoint is not None:
            raise ValueError("--format gguf: expected --model DIR (a model folder; `seekmoe export --checkpoint` "
                             "turns a checkpoint into one first), not --checkpoint")
        try:
            import gguf  # noqa: F401
        except ModuleNotFoundError:
            raise ValueError("--format gguf needs the gguf package: pip install 'seekmoe[gguf]'") from None
        from ..gguf_export import export_gguf

        result = export_gguf(args.model, args.out, args.outtype)
        for note in result.notes:
            print(note)
        print(f"exported {args.model} to {result.path} ({result.n_tensors} tensors, {args.outtype})")
        return 0
    if args.checkpoint is None or args.model is not None:
        raise ValueError("--format hf: expected --checkpoint DIR (a training checkpoint), not --model")
    from .export import export_checkpoint

    source = export_checkpoint(args.checkpoint, args.out)
    print(f"exported {source} to {args.out}")
    return 0
