"""The grow commands: `seekmoe expand` adds routed experts to a trained model's MoE layers; `seekmoe upcycle`
turns a dense model into a DeepSeekMoE that starts out computing what it computed. Each writes a model folder."""

from __future__ import annotations

import argparse

EXPAND_EPILOG = """\
then train only what is new on the new domain, e.g.:
  seekmoe train --init-from OUT --data NEW_TEXT --out RUN --train new-experts,router \\
      new_expert_bias_update_speed=0.05 new_expert_onboarding_steps=50
--init zero keeps the old outputs exactly and starts the new experts out of every top-k; the auxiliary-loss-free
bias update then raises their selection bias by bias_update_speed a step (and lowers the old experts', all above the
mean load) until they get tokens: about (1 + spread of the old biases) / (2 x speed) steps (54 at speed 0.01 in
benchmarks/grow.py); new_expert_bias_update_speed makes that faster for the new experts.
--init copy (default) starts each new expert as a noisy copy of an old expert of its router group; the outputs move.
DeepSeek-V4's hash-routed layers pick experts from a frozen token table that names the old experts only: their new
experts get no tokens (the command says so), unless --init copy --rehash F hands a fraction F of each copied
expert's tokens to its copies (0.5 splits them evenly with one copy).
"""

def add_expand_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the `expand` command's options."""
    parser.epilog = EXPAND_EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--model", required=True, metavar="DIR", help="a trained model folder (e.g. a run's final/)")
    parser.add_argument("--add-experts", required=True, type=int, metavar="N",
                        help="routed experts to add to every MoE layer (N / n_group at the end of each router group; "
                             "when N is not a multiple of n_group, groups merge and the command says so)")
    parser.add_argument("--out", required=True, metavar="DIR", help="where the expanded model folder goes")
    parser.add_argument("--init", choices=("copy", "zero"), default="copy",
                        help="copy: noisy copies of old experts of the same group, router rows and biases copied "
                             "(default); zero: unselectable until training raises their bias, zero down projections, "
                             "so the outputs are exactly the old model's")
    parser.add_argument("--layers", type=int, nargs="+", metavar="I",
                        help="only these layers (numbered as on disk; MTP modules follow the main layers) get live "
                             "new experts; the others get dormant, never-selected slots (default: every MoE layer)")
    parser.add_argument("--noise", type=float, default=0.01, metavar="R",
                        help="relative noise on copied weights, router rows and biases (default 0.01)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the noise and initialization")
    parser.add_argument("--rehash", type=float, default=0.0, metavar="F",
                        help="hash-routed layers (DeepSeek-V4): move this fraction of the token-table entries that "
                             "name a copied expert to its copies, chosen at random with --seed (needs --init copy; "
                             "default 0: the table keeps naming old experts and the new ones there get no tokens)")


def run_expand(args: argparse.Namespace) -> int:
    """Run `seekmoe expand`; returns the exit status."""
    import torch

    from .expand import expand_model
    from .folders import load_source, parameter_change, save_grown

    source, out, model = load_source(args.model, args.out, "expanded")
    torch.manual_seed(args.seed)
    grown, report = expand_model(model, args.add_experts, layers=args.layers, init=args.init, noise=args.noise,
                                 seed=args.seed, rehash=args.rehash)
    save_grown(grown, source, out)
    print(f"routed experts per MoE layer: {report.experts_before} -> {report.experts_after} "
          f"(init {args.init}); new experts in {len(report.layers)} layer(s): {', '.join(report.layers)}")
    if report.dormant_layers:
        print(f"dormant (never selected) slots in: {', '.join(report.dormant_layers)}")
    for change in report.changes:
        print(f"changed: {change}")
    for note in report.notes:
        print(f"note: {note}")
    print(parameter_change(model.config, grown.config))
    if args.init == "zero":
        print("outputs: exactly the old model's (new experts unselectable, zero down projections)" if report.exact
              else "outputs: changed by the new router groups (see above)")
    print(f"expanded model: {out} (the added experts are listed in config.json under 'grown_experts')")
    return 0


UPCYCLE_EPILOG = """\
examples:
  seekmoe train --preset small-dense --out dense                 # a dense model (every layer a SwiGLU FFN)
  seekmoe upcycle --model dense/final --experts 8 --top-k 2 --out moe                       # Komatsuzaki et al.
  seekmoe upcycle --model dense/final --experts 32 --top-k 8 --granularity 4 --shared 4 --out moe  # fine-grained
  seekmoe train --init-from moe --out moe-run
The routed experts are copies of each FFN (or, with --granularity G, G slices of each copy, I/G wide, whose router
rows are tiled so top-k takes whole copies, routed_scaling_factor G restoring the size); --shared S experts hold
S/G whole copies. The upcycled model's outputs equal the dense model's up to float rounding (about 1e-6).
"""

def add_upcycle_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the `upcycle` command's options."""
    parser.epilog = UPCYCLE_EPILOG
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


def run_upcycle(args: argparse.Namespace) -> int:
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
