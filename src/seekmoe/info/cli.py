"""`seekmoe info`: what a preset or a model directory costs, counted without allocating it."""

from __future__ import annotations

import argparse
import json

from ..config import PRESETS, ModelConfig
from . import DTYPE_BYTES, format_summary, model_summary


def add_info_arguments(p: argparse.ArgumentParser) -> None:
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--preset", choices=sorted(PRESETS), help="a built-in configuration")
    which.add_argument("--model", metavar="DIR", help="a Hugging Face-layout model directory (reads its config.json)")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    p.add_argument("--context", type=int, default=4096, help="context length for attention FLOPs (default 4096)")
    p.add_argument("--cache-dtype", choices=sorted(DTYPE_BYTES), default="bfloat16",
                   help="element type of the KV cache (default bfloat16)")


def run_info(args: argparse.Namespace) -> int:
    if args.context <= 0:
        raise ValueError(f"--context={args.context}: expected a positive number of tokens")
    config = ModelConfig.preset(args.preset) if args.preset else ModelConfig.from_json_file(args.model)
    summary = model_summary(config, context=args.context, cache_dtype=args.cache_dtype)
    if args.json:
        print(json.dumps({"model": args.preset or args.model, **summary}, indent=2))
    else:
        print(format_summary(args.preset or args.model, summary))
    return 0
