"""`seekmoe quantize` (write an int8/int4 copy of a model folder) and the --quantize flags of generate, chat and
serve (quantize on load)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .formats import DEFAULT_GROUP_SIZE, SCHEMES, QuantSpec, bytes_per_weight

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_quantize_flags(p: argparse.ArgumentParser) -> None:
    """--quantize, --group-size and --quantize-embeddings, for the commands that load a model to run it."""
    p.add_argument("--quantize", choices=SCHEMES, default=None,
                   help="quantize the weights on load: routed experts (per expert), shared experts, dense MLPs and "
                        "attention projections to int8 (per output channel) or int4 (per group of --group-size "
                        "inputs); norms, routers and MLA's kv_b_proj keep --dtype. Faster decoding needs --compile "
                        "on (fused products reading the quantized bytes); eager, it saves memory but not time "
                        "(default: off; a folder written by `seekmoe quantize` is quantized already)")
    p.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE, metavar="G",
                   help=f"int4: inputs sharing one scale; must divide every quantized width (default "
                        f"{DEFAULT_GROUP_SIZE}, 4.5 bits a weight)")
    p.add_argument("--quantize-embeddings", action="store_true",
                   help="quantize the token embedding and the output head too (default: they keep --dtype)")


def quant_spec(args: argparse.Namespace, scheme: str | None) -> QuantSpec | None:
    """The QuantSpec the flags ask for (None without a scheme); ValueError names a bad --group-size."""
    if scheme is None:
        if args.quantize_embeddings:
            raise ValueError("--quantize-embeddings needs a scheme: expected --quantize int8 or int4 too")
        return None
    if args.group_size < 2 or args.group_size % 2:
        raise ValueError(f"--group-size={args.group_size}: expected an even number of at least 2")
    return QuantSpec(scheme, args.group_size)


def add_quantize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="DIR", required=True, help="the model folder to quantize (never written)")
    p.add_argument("--scheme", choices=SCHEMES, required=True,
                   help="int8 (per output channel) or int4 (per group of --group-size inputs), weight-only")
    p.add_argument("--out", metavar="DIR", required=True,
                   help="the new folder: config.json with a quantization_config, model.safetensors, and the "
                        "model's tokenizer files; `seekmoe generate|chat|serve --model DIR` load it as it is")
    p.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE, metavar="G",
                   help=f"int4: inputs sharing one scale; must divide every quantized width (default "
                        f"{DEFAULT_GROUP_SIZE})")
    p.add_argument("--embeddings", action="store_true",
                   help="quantize the token embedding and the output head too (default: they keep --dtype)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="dtype of what stays unquantized (norms, routers, kv_b_proj, embeddings) and of the "
                        "activations (default: the checkpoint's)")


def run_quantize(args: argparse.Namespace) -> int:
    from .. import from_pretrained
    from ..model_folder import check_fits_memory, config_from_dict, read_config_json
    from .folder import is_quantized_folder, save_quantized
    from .modules import quantize_model, quantized_bytes

    source, out = Path(args.model), Path(args.out)
    if not source.is_dir():
        raise FileNotFoundError(f"--model {source}: no such directory")
    if out.resolve() == source.resolve():
        raise ValueError(f"--out {out} is the --model folder: expected a new folder (the source is never written)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not an empty folder: expected a new folder")
    if is_quantized_folder(source):
        raise ValueError(f"--model {source} is quantized already: expected a float model folder")
    if args.group_size < 2 or args.group_size % 2:
        raise ValueError(f"--group-size={args.group_size}: expected an even number of at least 2")
    spec = QuantSpec(args.scheme, args.group_size)
    # Only the quantized copy must fit: a folder larger than memory is mapped from its files (its own dtype) and
    # read a stack at a time while quantizing.
    config = config_from_dict(read_config_json(source / "config.json"), str(source / "config.json"))
    check_fits_memory(config, bytes_per_weight(spec), f"{spec.scheme} weights", torch.device("cpu"),
                      source=str(source))
    model = from_pretrained(source, dtype=DTYPES[args.dtype] if args.dtype else None, mmap="auto")
    before = sum(p.numel() * p.element_size() for p in model.parameters())
    quantize_model(model, spec, embeddings=args.embeddings)  # checks every width before changing anything
    save_quantized(model, out, source)
    after = sum(p.numel() * p.element_size() for p in model.parameters()) + quantized_bytes(model)
    print(f"wrote {out}: {spec.scheme} weights ({bytes_per_weight(spec):.3g} bytes a weight), "
          f"{before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB", file=sys.stderr)
    return 0
