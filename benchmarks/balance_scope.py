"""Global-batch against micro-batch balance statistics (TrainConfig.balance_scope): the same small model trained
twice, same seed and data, with the expert-level balance loss counting f_i over every micro-batch of an optimizer
step (global) or over each micro-batch alone (micro); then validation loss, MaxVio and how much each expert
specialises in a "domain" (a package of the Python standard library) on held-out files.

    python benchmarks/balance_scope.py                  # preset "small", 800 steps of 8 x 2 x 128 tokens, fp32: ~5 min
    python benchmarks/balance_scope.py --steps 3000     # longer runs
    python benchmarks/balance_scope.py --quick          # smoke run

On a shared machine run single-threaded (`OMP_NUM_THREADS=1`): with other jobs on the cores, two OpenMP threads
made these runs about 10x slower here (see README.md). Wall times in the comments are single-threaded,
on a loaded 2-core machine.

The expert-level balance loss (`expert_balance_alpha`) is the only balancing: the sequence-wise loss
(`aux_loss_alpha`) and the auxiliary-loss-free bias (`bias_update_speed`) are off, so that what the scope changes
is all that differs. Micro-batches are small (2 sequences) so that one micro-batch holds one or two documents and the
two scopes really count different batches ("Demons in the Detail", Qwen 2025, found global-batch balancing gives
lower perplexity and more specialised experts).
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, header, packed_sequences, pyplot, save_figure, table, write_json  # noqa: E402

import seekmoe  # noqa: E402
from seekmoe.data import default_corpus  # noqa: E402
from seekmoe.train import load_run_config, train  # noqa: E402
from seekmoe.train.metrics import read_metrics  # noqa: E402

DOMAINS = ("email", "asyncio", "xml", "unittest", "json")
SCOPES = ("micro", "global")
SPECIALIST = 1.25  # a domain "uses" an expert when it routes this many times its fair share of the expert's tokens
# (no domain reached 1.5x in the default 800-step runs; pass --specialist 2 for longer ones)


def split_domains(holdout_every: int) -> tuple[list[str], dict[str, list[Path]]]:
    """The default corpus without every `holdout_every`-th file of each domain package (sorted by path), and those
    held-out files by domain."""
    corpus, stdlib = default_corpus(), Path(sysconfig.get_paths()["stdlib"])
    held: dict[str, list[Path]] = {}
    for domain in DOMAINS:
        files = sorted(Path(f) for f in corpus.files if Path(f).relative_to(stdlib).parts[0] == domain)
        if not files:
            raise SystemExit(f"this Python's standard library ({stdlib}) has no {domain}/ package")
        held[domain] = files[holdout_every // 2::holdout_every] or files[:1]
    excluded = {p for files in held.values() for p in files}
    return [str(f) for f in corpus.files if Path(f) not in excluded], held


@torch.no_grad()
def route_domains(model_dir: Path, held: dict[str, list[Path]], seq_len: int, max_seqs: int, batch: int = 8):
    """Per domain: held-out next-token loss and expert counts [main MoE layers, E] of the final model."""
    from tokenizers import Tokenizer

    model = seekmoe.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    n_main = model.config.n_moe_layers
    out = {}
    for domain, files in held.items():
        seqs = packed_sequences(files, tokenizer, seq_len, max_seqs)
        counts, loss_sum = 0, 0.0
        for start in range(0, len(seqs), batch):
            ids = seqs[start:start + batch]
            result = model(ids, labels=ids)
            counts = counts + result.expert_counts[:n_main].double()
            loss_sum += float(result.lm_loss) * len(ids)
        out[domain] = {"sequences": len(seqs), "loss": loss_sum / len(seqs), "counts": counts}
    return out


def specialisation(routed: dict, threshold: float = SPECIALIST) -> dict:
    """How far each domain's expert-load distribution p_d is from the all-domain one p (both over a layer's
    experts): total-variation distance per (layer, domain), and the share of (layer, expert) pairs for which some
    domain's share of the expert's tokens is >= threshold x its share of all tokens (p_d[i] >= threshold * p[i]).
    Both compare with the all-domain load, so an expert every domain overloads counts as imbalance (MaxVio), not
    as specialisation."""
    counts = torch.stack([r["counts"] for r in routed.values()])  # [domains, layers, E]
    p_domain = counts / counts.sum(-1, keepdim=True)
    pooled = counts.sum(0)
    p_all = pooled / pooled.sum(-1, keepdim=True)  # [layers, E]
    tv = 0.5 * (p_domain - p_all).abs().sum(-1)  # [domains, layers]
    ratio = p_domain / p_all.clamp_min(1e-12)  # [domains, layers, E]
    specialists = (ratio.max(0).values >= threshold).double()  # [layers, E]
    return {"tv_mean": float(tv.mean()), "tv_by_domain": {d: float(tv[i].mean()) for i, d in enumerate(routed)},
            "specialist_share": float(specialists.mean()),
            "domain_vs_all": ratio.tolist(),  # [domains, layers, E]: 1.0 = the expert's all-domain load
            "all_domain_load": (p_all * counts.shape[-1]).tolist(),  # [layers, E]: 1.0 = fair share 1/E
            "counts": counts.tolist()}


def plot(results: dict, path: Path) -> Path | None:
    """Per scope, heatmaps of the last MoE layer: each domain's load per expert relative to the expert's
    all-domain load (specialisation, 1 = none), above the all-domain load relative to 1/E (imbalance)."""
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(2, len(results), figsize=(6 * len(results), 4.4), squeeze=False,
                             gridspec_kw={"height_ratios": [len(DOMAINS), 1.3]})
    for col, (scope, r) in enumerate(results.items()):
        s = r["specialisation"]
        ratio = torch.tensor([layers[-1] for layers in s["domain_vs_all"]])  # [domains, E]
        ax = axes[0][col]
        image = ax.imshow(ratio, cmap="RdBu_r", vmin=0, vmax=2, aspect="auto")
        ax.set_yticks(range(len(DOMAINS)), [f"{d}/" for d in DOMAINS])
        ax.set_xticks([])
        ax.set_title(f"balance_scope={scope}: domain TV {s['tv_mean']:.3f}, val {r['val_loss']:.3f}", fontsize=10)
        fig.colorbar(image, ax=ax, label="domain / all-domain load")
        ax = axes[1][col]
        image = ax.imshow(torch.tensor([s["all_domain_load"][-1]]), cmap="magma", vmin=0, vmax=2, aspect="auto")
        ax.set_yticks([0], ["all"])
        ax.set_xlabel("expert")
        fig.colorbar(image, ax=ax, label="load / (1/E)")
    fig.suptitle("held-out text routed by the last MoE layer", fontsize=11)
    return save_figure(fig, path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=800, help="optimizer steps per run")
    parser.add_argument("--batch", type=int, default=2, help="sequences per micro-batch")
    parser.add_argument("--grad-accum", type=int, default=8, help="micro-batches per optimizer step")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--alpha", type=float, default=0.02, help="expert_balance_alpha")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"])
    parser.add_argument("--specialist", type=float, default=SPECIALIST,
                        help="a domain uses an expert when its share of the expert's tokens is this many times its "
                             "share of all tokens")
    parser.add_argument("--seed", type=int, default=0, help="initialization and data order (both runs alike)")
    parser.add_argument("--tail", type=int, default=50, help="last steps whose MaxVio is averaged")
    parser.add_argument("--domain-seqs", type=int, default=48, help="held-out sequences routed per domain (at most)")
    parser.add_argument("--holdout-every", type=int, default=4, help="hold out every N-th file of each domain")
    parser.add_argument("--quick", action="store_true", help="smoke run: 10 steps, 4 sequences per domain")
    parser.add_argument("--keep", type=Path, help="keep the two runs' folders here (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=RESULTS / "balance_scope.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.domain_seqs, args.tail = 10, 4, 5

    train_files, held = split_domains(args.holdout_every)
    overrides = dict(seq_len=args.seq_len, batch_size=args.batch, grad_accum=args.grad_accum, max_steps=args.steps,
                     precision=args.precision, eval_every=args.steps, eval_batches=32, save_every=args.steps,
                     warmup_steps=min(20, args.steps // 10), seed=args.seed,
                     expert_balance_alpha=args.alpha, aux_loss_alpha=0.0, bias_update_speed=0.0,
                     num_nextn_predict_layers=0)
    print(header(f"balance_scope micro vs global: preset {args.preset!r}, {args.steps} steps of {args.grad_accum} "
                 f"micro-batches x {args.batch} x {args.seq_len} tokens, expert_balance_alpha={args.alpha} "
                 f"(aux_loss_alpha=0, bias_update_speed=0), seed {args.seed}"), flush=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    held_names = {d: [str(p.relative_to(stdlib / d)) for p in files] for d, files in held.items()}
    print(f"held out of training (routed at the end): {held_names}", flush=True)

    results, precision = {}, None
    with tempfile.TemporaryDirectory() as tmp:
        base = args.keep or Path(tmp)
        for scope in SCOPES:
            model_config, train_config = load_run_config(args.preset, overrides={**overrides, "balance_scope": scope})
            summary = train(model_config, train_config, base / scope, data=train_files, progress=False)
            precision = summary["precision"]
            records = [r for r in read_metrics(base / scope) if "max_vio" in r]
            tail = records[-args.tail:]
            routed = route_domains(base / scope / "final", held, args.seq_len, args.domain_seqs)
            results[scope] = {
                "val_loss": summary["final_val_loss"], "final_train_loss": summary["final_train_loss"],
                "max_vio_tail": sum(r["max_vio"] for r in tail) / len(tail),
                "max_vio_curve": [r["max_vio"] for r in records],
                "heldout_loss": sum(r["loss"] * r["sequences"] for r in routed.values())
                / sum(r["sequences"] for r in routed.values()),
                "heldout_loss_by_domain": {d: r["loss"] for d, r in routed.items()},
                "domain_sequences": {d: r["sequences"] for d, r in routed.items()},
                "specialisation": specialisation(routed, args.specialist)}
            print(f"  done {scope}", flush=True)

    print(f"\nprecision: {precision}\n")
    rows = [["balance_scope", "val loss", "held-out domain loss", f"MaxVio (last {args.tail} steps)",
             "domain TV distance", f"experts a domain uses >= {args.specialist:g}x"]]
    for scope, r in results.items():
        s = r["specialisation"]
        rows.append([scope, f"{r['val_loss']:.4f}", f"{r['heldout_loss']:.4f}", f"{r['max_vio_tail']:.3f}",
                     f"{s['tv_mean']:.3f}", f"{100 * s['specialist_share']:.0f}%"])
    print(table(rows))
    rows = [["domain", "held-out seqs"] + [f"TV {scope}" for scope in SCOPES] + [f"loss {scope}" for scope in SCOPES]]
    for d in DOMAINS:
        rows.append([f"{d}/", str(results[SCOPES[0]]["domain_sequences"][d])]
                    + [f"{results[s]['specialisation']['tv_by_domain'][d]:.3f}" for s in SCOPES]
                    + [f"{results[s]['heldout_loss_by_domain'][d]:.4f}" for s in SCOPES])
    print()
    print(table(rows))
    png = plot(results, args.out.with_suffix(".png"))
    if png:
        print(f"\nwrote {png}")
    write_json(args.out, {"preset": args.preset, "steps": args.steps, "batch": args.batch,
                          "grad_accum": args.grad_accum, "seq_len": args.seq_len, "expert_balance_alpha": args.alpha,
                          "seed": args.seed, "specialist_threshold": args.specialist,
                          "precision": precision, "held_out": held_names, "results": results})


if __name__ == "__main__":
    main()
