"""`seekmoe upcycle`: turn a dense seekmoe model into a DeepSeekMoE that starts out computing what it computed."""

from __future__ import annotations

import argparse

EPILOG = """\
examples:
  seekmoe train --preset small-dense --out dense                 # a dense model (every layer a SwiGLU FFN)
  seekmoe upcycle --model dense/final --experts 8 --top-k 2 --out moe                       # Komatsuzaki et al.
  seekmoe upcycle --model dense/final --experts 32 --top-k 8 --granularity 4 --shared 4 --out moe  # fine-grained
  seekmoe train --init-from moe --out moe-run
The routed experts are copies of each FFN (or, with --granularity G, G slices of each copy, I/G wide, whose router
rows are tiled so top-k takes whole copies, routed_scaling_factor G restoring the size); --shared S experts hold
S/G whole copies. The upcycled model's outputs equal the dense model's up to float rounding (about 1e-6).
"""

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the `upcycle` command's options."""
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="a dense model folder (every layer dense: first_k_dense_replace = num_hidden_layers, "
                             "or n_routed_experts = 0; presets tiny-dense, small-dense)")
    parser.add_argument("--experts", required=True, type=int, metavar="E", help="routed experts per MoE layer")
    parser.add_argument("--top-k", required=True, type=int, metavar="K",
                        help="experts each token uses (2 or more, a multiple of the granularity)")
    parser.add_argument("--shared", type=int, default=0, metavar="S",
                        help="shared experts (a multiple of the granularity; default 0)")
    parser.add_argument("--granularity", type=int, default=1, metavar="G",
                        help="fine-grained experts cut from each copy of the FFN (default 1: whole copies)")
    parser.add_argument("--first-k-dense", type=int, default=0, metavar="N",
                        help="keep the first N layers dense, as DeepSeek does (default 0: every FFN becomes a MoE)")
    parser.add_argument("--out", required=True, metavar="DIR", help="where the upcycled model folder goes")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the router rows")


def run(args: argparse.Namespace) -> int:
    """Run `seekmoe upcycle`; returns the exit status."""
    from .folders import load_source, parameter_change, save_grown
    from .upcycle import upcycle_model

    source, out, dense = load_source(args.model, args.out, "upcycled")
    moe, report = upcycle_model(dense, args.experts, args.top_k, args.shared, args.granularity, args.first_k_dense,
                                seed=args.seed)
    save_grown(moe, source, out)
    c = moe.config
    print(f"upcycled {len(report.moe_layers)} FFN(s) into MoE layers: {c.n_routed_experts} routed experts of width "
          f"{c.moe_intermediate_size} ({report.copies} copies x {args.granularity} slices), "
          f"top-{c.num_experts_per_tok}, "
          f"{c.n_shared_experts} shared; routed_scaling_factor {report.routed_scaling_factor:g}"
          + (f", shared down projections x {report.shared_scale:g}" if c.n_shared_experts else ""))
    print(parameter_change(dense.config, moe.config))
    print(f"upcycled model: {out}")
    return 0
