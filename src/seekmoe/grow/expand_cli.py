"""`seekmoe expand`: add routed experts to a trained model's MoE layers and write the grown model folder."""

from __future__ import annotations

import argparse

EPILOG = """\
then train only what is new on the new domain, e.g.:
  seekmoe train --init-from OUT --data NEW_TEXT --out RUN --train new-experts,router \\
      new_expert_bias_update_speed=0.05 new_expert_onboarding_steps=50
--init zero keeps the old outputs exactly and starts the new experts out of every top-k; the auxiliary-loss-free
bias update then raises their selection bias by bias_update_speed a step (and lowers the old experts', all above the
mean load) until they get tokens: about (1 + spread of the old biases) / (2 x speed) steps (54 at speed 0.01 in
benchmarks/grow.py); new_expert_bias_update_speed makes that faster for the new experts.
--init copy (default) starts each new expert as a noisy copy of an old expert of its router group; the outputs move.
"""

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the `expand` command's options."""
    parser.epilog = EPILOG
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


def run(args: argparse.Namespace) -> int:
    """Run `seekmoe expand`; returns the exit status."""
    import torch

    from .expand import expand_model
    from .folders import load_source, parameter_change, save_grown

    source, out, model = load_source(args.model, args.out, "expanded")
    torch.manual_seed(args.seed)
    grown, report = expand_model(model, args.add_experts, layers=args.layers, init=args.init, noise=args.noise,
                                 seed=args.seed)
    save_grown(grown, source, out)
    print(f"routed experts per MoE layer: {report.experts_before} -> {report.experts_after} "
          f"(init {args.init}); new experts in {len(report.layers)} layer(s): {', '.join(report.layers)}")
    if report.dormant_layers:
        print(f"dormant (never selected) slots in: {', '.join(report.dormant_layers)}")
    for change in report.changes:
        print(f"changed: {change}")
    print(parameter_change(model.config, grown.config))
    if args.init == "zero":
        print("outputs: exactly the old model's (new experts unselectable, zero down projections)" if report.exact
              else "outputs: changed by the new router groups (see above)")
    print(f"expanded model: {out} (the added experts are listed in config.json under 'grown_experts')")
    return 0
