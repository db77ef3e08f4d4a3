"""Our own Table 1 (DeepSeekMoE, Dai et al. 2024): dense, hash, Switch, GShard, noisy top-k and DeepSeekMoE trained
on the same tokens with the same schedule, at a scale a CPU trains in minutes per model; and DeepSeek-V3's
auxiliary-loss-free balancing against the sequence-wise auxiliary loss alone, with MaxVio.

    python benchmarks/architectures.py --quick      # 2 seeds x 7 arms, 150 steps each: 6 min on a loaded 2-core box
    python benchmarks/architectures.py --quick --steps 600   # the quick model trained 4x longer: about 20 min
    python benchmarks/architectures.py              # 2 seeds x 7 arms, 800 steps of a 2x wider model on 2x longer
                                                    # sequences: one to two hours (estimated, not yet measured)

On a shared machine run single-threaded (`OMP_NUM_THREADS=1`), as for balance_scope.py.

The arms keep the paper's proportions. One "FFN" is a SwiGLU of width --ffn; every MoE arm holds 16 FFNs' worth of
expert parameters in every layer (all layers are MoE, no MTP):
- dense: one FFN (1x activated);
- hash, switch: 16 experts of 1 FFN, 1 active (1x); switch drops tokens over capacity 1.25 (2.0 in evaluation);
- gshard: 16 experts of 1 FFN, 2 active (2x), capacity 1.25 / 2.0, random second expert;
- noisy top-k (not in the paper's table): 16 experts of 1 FFN, 2 active (2x);
- DeepSeekMoE: 1 shared + 63 routed experts of 0.25 FFN, 7 routed active (2x), DeepSeek-V3's router (sigmoid,
  normalized top-k), either auxiliary-loss-free (bias update speed --gamma, V3's complementary sequence-wise loss
  alpha 1e-4) or with the sequence-wise auxiliary loss alone (alpha --seq-alpha, no bias).
Each arm's own balancing is its paper's; everything else (data order, initialization seed, lr schedule, tokens) is
the same. Validation loss is on the default corpus's held-out documents; MaxVio is the mean over the last 10 steps
of the training batches' (max load - mean load) / mean load, averaged over MoE layers, for the experts the router
chose (before any capacity drop).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, header, table, write_json  # noqa: E402

from seekmoe.info import model_summary  # noqa: E402
from seekmoe.train import load_run_config, train  # noqa: E402

# Pile validation loss of the paper's 2B-parameter models (DeepSeekMoE Table 1).
PAPER_PILE_LOSS = {"dense": 2.060, "hash": 1.932, "switch": 1.881, "gshard": 1.867, "deepseekmoe_auxfree": 1.808}


def arms(ffn: int, gamma: float, seq_alpha: float) -> dict[str, dict]:
    """Each arm's ModelConfig overrides (on top of the shared shape)."""
    wide = dict(n_routed_experts=16, moe_intermediate_size=ffn, n_shared_experts=0)
    fine = dict(n_routed_experts=63, num_experts_per_tok=7, moe_intermediate_size=ffn // 4, n_shared_experts=1,
                router_type="deepseek", scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True)
    return {
        "dense": dict(n_routed_experts=0, n_shared_experts=0),
        "hash": dict(wide, router_type="hash", num_experts_per_tok=1),
        "switch": dict(wide, router_type="switch", num_experts_per_tok=1),
        "gshard": dict(wide, router_type="gshard", num_experts_per_tok=2),
        "noisy_topk": dict(wide, router_type="noisy_topk", num_experts_per_tok=2),
        "deepseekmoe_auxfree": dict(fine, bias_update_speed=gamma, aux_loss_alpha=1e-4),
        "deepseekmoe_seqaux": dict(fine, bias_update_speed=0.0, aux_loss_alpha=seq_alpha),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default 800, 150 with --quick)")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per arm (initialization and data order)")
    parser.add_argument("--hidden", type=int, default=128, help="hidden_size")
    parser.add_argument("--ffn", type=int, default=256, help="width of one standard FFN (the dense arm's MLP)")
    parser.add_argument("--layers", type=int, default=2, help="num_hidden_layers (all MoE)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--gamma", type=float, default=0.01, help="bias_update_speed of the aux-loss-free arm")
    parser.add_argument("--seq-alpha", type=float, default=0.01, help="aux_loss_alpha of the seq-aux-only arm")
    parser.add_argument("--eval-batches", type=int, default=32, help="validation micro-batches per evaluation")
    parser.add_argument("--only", nargs="*", help="run only these arms")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"])
    parser.add_argument("--quick", action="store_true",
                        help="hidden 64, FFN 128, 8 x 64 tokens a step, 150 steps (unless --steps)")
    parser.add_argument("--keep", type=Path, help="keep the runs' folders here (default: a temporary folder)")
    parser.add_argument("--out", type=Path, help="JSON output (default benchmarks/results/architectures[_quick].json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.ffn, args.seq_len, args.eval_batches = 64, 128, 64, 16
    args.steps = args.steps or (150 if args.quick else 800)
    out_path = args.out or RESULTS / ("architectures_quick.json" if args.quick else "architectures.json")
    chosen = arms(args.ffn, args.gamma, args.seq_alpha)
    if args.only:
        unknown = set(args.only) - set(chosen)
        if unknown:
            raise SystemExit(f"--only: unknown arm(s) {sorted(unknown)}: expected some of {sorted(chosen)}")
        chosen = {k: v for k, v in chosen.items() if k in args.only}

    shape = dict(hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
                 first_k_dense_replace=0, num_nextn_predict_layers=0, n_group=1, topk_group=1)
    schedule = dict(seq_len=args.seq_len, batch_size=args.batch, max_steps=args.steps, lr=args.lr,
                    warmup_steps=max(1, args.steps // 20), eval_every=args.steps, save_every=args.steps,
                    eval_batches=args.eval_batches, precision=args.precision)
    print(header(f"architectures (DeepSeekMoE Table 1 at small scale): {len(chosen)} arms x {args.seeds} seeds, "
                 f"{args.steps} steps of {args.batch} x {args.seq_len} tokens, hidden {args.hidden}, FFN "
                 f"{args.ffn}, {args.layers} layers (all MoE), lr {args.lr}"), flush=True)

    results: dict[str, dict] = {}
    precision = None
    with tempfile.TemporaryDirectory() as tmp:
        base = args.keep or Path(tmp)
        for name, arm in chosen.items():
            runs = []
            for seed in range(args.seeds):
                model_config, train_config = load_run_config("tiny", overrides={**shape, **arm, **schedule,
                                                                                "seed": seed})
                summary = train(model_config, train_config, base / f"{name}-{seed}", progress=False)
                precision = summary["precision"]
                runs.append({"seed": seed, "val_loss": summary["final_val_loss"],
                             "train_loss": summary["final_train_loss"],
                             "max_vio": summary["max_vio"] if model_config.n_routed_experts else None,
                             "train_seconds": summary["train_seconds"]})
                print(f"  {name} seed {seed}: val {summary['final_val_loss']:.4f}, "
                      f"{summary['train_seconds']:.0f} s", flush=True)
            sizes = model_summary(model_config, context=args.seq_len)
            losses = [r["val_loss"] for r in runs]
            vios = [r["max_vio"] for r in runs if r["max_vio"] is not None]
            results[name] = {
                "config": arm, "runs": runs, "total_params": sizes["total_params"],
                "active_params": sizes["active_params"], "flops_per_token": sizes["flops_per_token"],
                "val_loss_mean": statistics.mean(losses), "val_loss_spread": max(losses) - min(losses),
                "max_vio_mean": statistics.mean(vios) if vios else None,
                "train_seconds_mean": statistics.mean(r["train_seconds"] for r in runs),
                "paper_pile_loss": PAPER_PILE_LOSS.get(name)}

    print(f"\nprecision: {precision}\n")
    rows = [["arm", "total params", "activated", "FLOPs/token", f"val loss (mean of {args.seeds})",
             "spread (max-min)", "MaxVio", "train s/run", "paper Pile loss"]]
    for name, r in results.items():
        rows.append([name, f"{r['total_params'] / 1e6:.2f}M", f"{r['active_params'] / 1e6:.2f}M",
                     f"{r['flops_per_token'] / 1e6:.2f}M", f"{r['val_loss_mean']:.4f}", f"{r['val_loss_spread']:.4f}",
                     "-" if r["max_vio_mean"] is None else f"{r['max_vio_mean']:.3f}",
                     f"{r['train_seconds_mean']:.0f}",
                     "-" if r["paper_pile_loss"] is None else f"{r['paper_pile_loss']:.3f}"])
    print(table(rows))
    ours = [n for n in sorted(results, key=lambda n: results[n]["val_loss_mean"]) if n in PAPER_PILE_LOSS]
    paper = sorted(ours, key=PAPER_PILE_LOSS.get)
    print(f"\nordering by val loss here: {' < '.join(ours)}\nthe paper's ordering:      {' < '.join(paper)}")
    write_json(out_path, {"steps": args.steps, "seeds": args.seeds, "hidden": args.hidden, "ffn": args.ffn,
                          "layers": args.layers, "batch": args.batch, "seq_len": args.seq_len, "lr": args.lr,
                          "precision": precision, "quick": args.quick, "results": results,
                          "ordering": ours, "paper_ordering": paper})


if __name__ == "__main__":
    main()
