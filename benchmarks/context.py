"""Context extension as its own stage (`seekmoe train --init-from DIR --extend-context LEN`): a small model
pretrained with plain RoPE at seq_len S (max_position_embeddings = S), then extended with YaRN to 4S in a short
run; validation loss by position bucket (0-S, S-2S, ... tokens) on the longest modules of the Python standard
library, which are held out of both stages.

    python benchmarks/context.py                # S=128: 800 pretraining + 100 extension steps, fp32: ~5 min
    python benchmarks/context.py --seq-len 256 --pretrain-steps 1500 --extend-steps 200   # longer
    python benchmarks/context.py --quick        # smoke run

On a shared machine run single-threaded (`OMP_NUM_THREADS=1`): with other jobs on the cores, two OpenMP threads
made these runs about 10x slower here (see README.md). Wall times in the comments are single-threaded,
on a loaded 2-core machine.

Rows: the pretrained model as is (plain RoPE, read beyond the context it was trained at), the same weights with
the extension's YaRN config but no extension training (what the config alone does), a control that trains the
pretrained model as many more steps at S with plain RoPE (the extension's lr, tokens per step and long documents:
what the extra training alone does), and the extended model.
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, header, pyplot, save_figure, table, write_json  # noqa: E402

import seekmoe  # noqa: E402
from seekmoe.data import BOS_TOKEN, EOS_TOKEN, default_corpus  # noqa: E402
from seekmoe.train import load_run_config, train  # noqa: E402


def longest_modules(n: int) -> tuple[list[str], list[Path]]:
    """The default corpus without its `n` largest files, and those files (largest first)."""
    files = [Path(f) for f in default_corpus().files]
    longest = sorted(files, key=lambda f: -f.stat().st_size)[:n]
    return [str(f) for f in files if f not in set(longest)], longest


def eval_windows(files: list[Path], tokenizer, length: int, per_file: int) -> torch.Tensor:
    """Up to `per_file` non-overlapping windows [length] from the start of each document (<|begin_of_text|> text
    <|end_of_text|>, as training packs them), so that position p of a window is position p of a real text."""
    bos, eos = tokenizer.token_to_id(BOS_TOKEN), tokenizer.token_to_id(EOS_TOKEN)
    windows = []
    for f in files:
        ids = [bos] + tokenizer.encode(f.read_text(encoding="utf-8", errors="replace")).ids + [eos]
        for w in range(min(per_file, len(ids) // length)):
            windows.append(torch.tensor(ids[w * length:(w + 1) * length]))
    if not windows:
        raise SystemExit(f"no evaluation document has {length} tokens")
    return torch.stack(windows)


@torch.no_grad()
def loss_by_position(model, windows: torch.Tensor, batch: int = 4) -> torch.Tensor:
    """Mean next-token loss at each position [length - 1] over the windows."""
    model.eval()
    total = torch.zeros(windows.shape[1] - 1, dtype=torch.float64)
    for start in range(0, len(windows), batch):
        ids = windows[start:start + batch]
        logits = model(ids).logits[:, :-1].float()
        loss = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # [b, length - 1]
        total += loss.double().sum(0)
    return total / len(windows)


def buckets(per_position: torch.Tensor, size: int) -> list[float]:
    """Mean loss over each bucket of `size` positions (the loss at position p predicts token p + 1)."""
    return [float(per_position[i:i + size].mean()) for i in range(0, len(per_position), size)]


def plot(curves: dict[str, torch.Tensor], seq_len: int, path: Path) -> Path | None:
    """Loss against position (smoothed over 16 positions), one line per model, the pretraining context marked."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(8, 5.2))
    width = 16
    for name, curve in curves.items():
        smooth = curve[:len(curve) // width * width].view(-1, width).mean(1)
        ax.plot([(i + 0.5) * width for i in range(len(smooth))], smooth.tolist(), label=name)
    ax.axvline(seq_len, color="grey", linestyle="--", linewidth=1)
    ax.text(seq_len, ax.get_ylim()[0], " pretraining context", va="bottom", fontsize=8, color="grey")
    ax.set_xlabel("position (tokens)")
    ax.set_ylabel(f"next-token loss (mean over {width} positions)")
    ax.set_title("held-out longest stdlib modules: loss by position")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    return save_figure(fig, path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--seq-len", type=int, default=128, help="S: pretraining seq_len and max_position_embeddings")
    parser.add_argument("--factor", type=int, default=4, help="extend to factor x S tokens")
    parser.add_argument("--pretrain-steps", type=int, default=800)
    parser.add_argument("--extend-steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=16, help="pretraining sequences per step (the extension "
                        "keeps the tokens per step: batch / factor sequences)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"])
    parser.add_argument("--eval-docs", type=int, default=12, help="longest stdlib modules held out and evaluated")
    parser.add_argument("--windows-per-doc", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="smoke run: 10 + 4 steps, 3 documents")
    parser.add_argument("--keep", type=Path, help="keep the two stages' folders here (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=RESULTS / "context.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.pretrain_steps, args.extend_steps, args.eval_docs, args.windows_per_doc = 10, 4, 3, 1
    s, long = args.seq_len, args.factor * args.seq_len

    train_files, eval_files = longest_modules(args.eval_docs)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    print(header(f"Context extension: preset {args.preset!r} pretrained {args.pretrain_steps} steps at {s} tokens "
                 f"(plain RoPE), extended {args.extend_steps} steps at {long} tokens (YaRN factor {args.factor})"),
          flush=True)
    print(f"evaluated on (held out of both stages): {[str(f.relative_to(stdlib)) for f in eval_files]}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        base = args.keep or Path(tmp)
        common = dict(precision=args.precision, eval_batches=8)
        model_config, train_config = load_run_config(args.preset, overrides={
            **common, "seq_len": s, "max_position_embeddings": s, "max_steps": args.pretrain_steps,
            "batch_size": args.batch, "eval_every": args.pretrain_steps, "save_every": args.pretrain_steps,
            "warmup_steps": min(20, args.pretrain_steps // 10)})
        pre = train(model_config, train_config, base / "pretrain", data=train_files, progress=False)
        ext_batch = max(1, args.batch // args.factor)
        ext_model_config, ext_train_config = load_run_config(None, overrides={
            **common, "max_steps": args.extend_steps, "batch_size": ext_batch, "eval_every": args.extend_steps,
            "save_every": args.extend_steps}, init_from=base / "pretrain" / "final", extend_context=long)
        print(f"extension stage: rope_scaling {ext_model_config.rope_scaling}, lr {ext_train_config.lr:g}, "
              f"min_file_bytes {ext_train_config.min_file_bytes}", flush=True)
        ext = train(ext_model_config, ext_train_config, base / "extend", data=train_files, progress=False,
                    init_from=base / "pretrain" / "final")
        control_model_config, control_train_config = load_run_config(None, overrides={
            **common, "max_steps": args.extend_steps, "batch_size": args.batch, "seq_len": s,
            "lr": ext_train_config.lr, "warmup_steps": 0, "min_lr_ratio": 1.0,
            "min_file_bytes": ext_train_config.min_file_bytes, "eval_every": args.extend_steps,
            "save_every": args.extend_steps}, init_from=base / "pretrain" / "final")
        train(control_model_config, control_train_config, base / "control", data=train_files, progress=False,
              init_from=base / "pretrain" / "final")

        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(base / "pretrain" / "final" / "tokenizer.json"))
        windows = eval_windows(eval_files, tokenizer, long, args.windows_per_doc)
        pretrained = seekmoe.from_pretrained(base / "pretrain" / "final", dtype=torch.float32)
        yarn_only = seekmoe.build_model(ext_model_config)
        yarn_only.load_state_dict(pretrained.state_dict())
        control = seekmoe.from_pretrained(base / "control" / "final", dtype=torch.float32)
        extended = seekmoe.from_pretrained(base / "extend" / "final", dtype=torch.float32)
        models = {"pretrained (plain RoPE)": pretrained, "pretrained + YaRN config, no extension training": yarn_only,
                  f"control: {args.extend_steps} more steps at {s} (plain RoPE)": control,
                  f"extended (YaRN, {args.extend_steps} steps at {long})": extended}
        curves = {name: loss_by_position(model, windows) for name, model in models.items()}

    print(f"\nprecision: pretraining {pre['precision']}, extension {ext['precision']}; {len(windows)} windows of "
          f"{long} tokens from {len(eval_files)} documents; pretraining val loss {pre['final_val_loss']:.4f}, "
          f"extension val loss {ext['final_val_loss']:.4f} (at {long} tokens, long documents)\n")
    edges = list(range(0, long, s))
    rows = [["model"] + [f"{a}-{a + s}" for a in edges]]
    for name, curve in curves.items():
        rows.append([name] + [f"{v:.3f}" for v in buckets(curve, s)])
    print(table(rows))
    png = plot(curves, s, args.out.with_suffix(".png"))
    if png:
        print(f"\nwrote {png}")
    write_json(args.out, {
        "preset": args.preset, "seq_len": s, "extended_to": long, "pretrain_steps": args.pretrain_steps,
        "extend_steps": args.extend_steps, "precision": {"pretrain": pre["precision"], "extend": ext["precision"]},
        "rope_scaling": ext_model_config.rope_scaling, "extend_lr": ext_train_config.lr,
        "eval_documents": [str(f.relative_to(stdlib)) for f in eval_files], "windows": len(windows),
        "val_loss": {"pretrain": pre["final_val_loss"], "extend": ext["final_val_loss"]},
        "buckets": [[a, a + s] for a in edges],
        "loss_by_bucket": {name: buckets(curve, s) for name, curve in curves.items()},
        "loss_by_position": {name: [round(v, 4) for v in curve.tolist()] for name, curve in curves.items()}})


if __name__ == "__main__":
    main()
