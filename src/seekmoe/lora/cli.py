"""`seekmoe merge` (an adapter into a new model folder), and the LoRA options that sft, rl and train share."""

from __future__ import annotations

import argparse

from .config import DEFAULT_TARGETS, TARGETS


def add_merge_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the `merge` command's options."""
    parser.add_argument("--model", required=True, metavar="DIR", help="the base model folder the adapter was "
                                                                       "trained on (only read)")
    parser.add_argument("--adapter", required=True, metavar="DIR",
                        help="a PEFT LoRA adapter folder (adapter_config.json, adapter_model.safetensors), e.g. a "
                             "run's OUT/adapter/")
    parser.add_argument("--out", required=True, metavar="DIR", help="the new model folder to write (must not exist "
                                                                     "or be empty)")


def run_merge(args: argparse.Namespace) -> int:
    """Run `seekmoe merge`; returns the exit status."""
    from .merge import merge_adapter

    out = merge_adapter(args.model, args.adapter, args.out)
    print(f"merged {args.adapter} into {args.model}: {out}")
    return 0


def add_lora_arguments(parser: argparse.ArgumentParser, quantize: bool = False) -> None:
    """--lora RANK, --lora-alpha, --lora-dropout, --lora-targets (and --quantize nf4 where `quantize`)."""
    group = parser.add_argument_group("LoRA (adapters instead of full fine-tuning; writes OUT/adapter/ in PEFT's "
                                      "format and the merged OUT/final/)")
    group.add_argument("--lora", type=int, metavar="RANK", help="train rank-RANK LoRA adapters, the base frozen")
    group.add_argument("--lora-alpha", type=float, metavar="A", help="scaling alpha (adapters add alpha/RANK * B A; "
                                                                      "default 2 * RANK)")
    group.add_argument("--lora-dropout", type=float, metavar="P",
                       help="dropout on the adapters' inputs (default 0; attention targets only, as PEFT runs "
                            "expert and MLP adapters without)")
    group.add_argument("--lora-targets", metavar="LIST",
                       help=f"comma-separated, of {', '.join(TARGETS)} (default {DEFAULT_TARGETS}; router trains the "
                            f"routers' weights in full, their balancing biases move by the auxiliary-loss-free rule "
                            f"either way)")
    if quantize:
        group.add_argument("--quantize", choices=["nf4"], help="QLoRA: the frozen base weights in 4-bit NormalFloat "
                                                               "(needs torchao)")


def lora_overrides(args: argparse.Namespace) -> dict | None:
    """TrainConfig's `lora` section from the flags (None without --lora); ValueError for LoRA flags without it."""
    section = {k: getattr(args, f"lora_{k}", None) for k in ("alpha", "dropout", "targets")}
    quantize = getattr(args, "quantize", None)
    if args.lora is None:
        given = [f"--lora-{k}" for k, v in section.items() if v is not None] + (["--quantize"] if quantize else [])
        if given:
            raise ValueError(f"{given[0]} needs --lora RANK")
        return None
    section = {k: v for k, v in section.items() if v is not None}
    if quantize:
        section["quantize"] = quantize
    return {"rank": args.lora, **section}
