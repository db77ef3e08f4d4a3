"""Muon against AdamW (TrainConfig.optimizer): the same model trained with each, same seed, data, learning rate,
weight decay and schedule (Moonlight's recipe matches Muon's update RMS to AdamW's, so it reuses AdamW's settings),
compared by validation loss at equal steps, for two seeds.

    python benchmarks/muon_vs_adamw.py                     # preset "small", 600 steps of 8 x 128 tokens, two seeds
    python benchmarks/muon_vs_adamw.py --steps 2000 --seeds 0 1 2
    python benchmarks/muon_vs_adamw.py --quick             # smoke run: 12 steps, one seed

On a shared machine run single-threaded (`OMP_NUM_THREADS=1`). Only losses are compared, never times.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, header, table, write_json  # noqa: E402

from seekmoe.train import load_run_config, train  # noqa: E402
from seekmoe.train.metrics import read_metrics  # noqa: E402

OPTIMIZERS = ("adamw", "muon")


def run(preset: str, optimizer: str, seed: int, overrides: dict, out: Path) -> dict:
    """Train one model; its validation losses by step, and the run summary."""
    model_config, train_config = load_run_config(preset, overrides={**overrides, "optimizer": optimizer,
                                                                    "seed": seed})
    summary = train(model_config, train_config, out, progress=False)
    evals = {r["step"]: r["val_loss"] for r in read_metrics(out) if "val_loss" in r}
    return {"val_loss": evals, "final_val_loss": summary["final_val_loss"],
            "final_train_loss": summary["final_train_loss"], "precision": summary["precision"]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps per run")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of both optimizers")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"])
    parser.add_argument("--quick", action="store_true", help="smoke run: 12 steps, one seed")
    parser.add_argument("--out", type=Path, default=RESULTS / "muon_vs_adamw.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.eval_every, args.seeds = 12, 6, args.seeds[:1]
    overrides = {"max_steps": args.steps, "batch_size": args.batch, "seq_len": args.seq_len, "lr": args.lr,
                 "weight_decay": args.weight_decay, "eval_every": args.eval_every, "save_every": args.steps,
                 "warmup_steps": max(1, args.steps // 20), "precision": args.precision, "eval_batches": 8}
    print(header(f"muon_vs_adamw: preset {args.preset!r}, {args.steps} steps of {args.batch} x {args.seq_len} "
                 f"tokens, lr {args.lr}, weight decay {args.weight_decay}, seeds {args.seeds}"))
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for optimizer in OPTIMIZERS:
                key = f"{optimizer}/seed{seed}"
                results[key] = run(args.preset, optimizer, seed, overrides, Path(tmp) / key)
                print(f"{key}: final validation loss {results[key]['final_val_loss']:.4f}", flush=True)
    steps = sorted(next(iter(results.values()))["val_loss"])
    rows = [["step", *results]] + [[str(s), *(f"{r['val_loss'].get(s, float('nan')):.4f}" for r in results.values())]
                                   for s in steps]
    print("\nvalidation loss at equal steps\n" + table(rows))
    gaps = [results[f"muon/seed{s}"]["final_val_loss"] - results[f"adamw/seed{s}"]["final_val_loss"]
            for s in args.seeds]
    print(f"\nfinal validation loss, muon - adamw: {', '.join(f'{g:+.4f}' for g in gaps)} (seeds {args.seeds})")
    write_json(args.out, {"args": {k: str(v) for k, v in vars(args).items()}, "results": {
        k: {**v, "val_loss": {str(s): x for s, x in v["val_loss"].items()}} for k, v in results.items()}})


if __name__ == "__main__":
    main()
