"""Context extension as its own stage (issue 16, DeepSeek-V3 section 4.3): validation loss by position before and
after `seekmoe train --init-from DIR --extend-context LEN`.

    python benchmarks/context.py                 # small preset: pretrain at 128 tokens, extend to 512; minutes
    python benchmarks/context.py --quick         # tiny preset, a few steps

A model pretrained with plain RoPE at --seq-len S (max_position_embeddings = S) is extended with YaRN to 4S. Both
are scored on the longest modules of the Python standard library (documents nobody chose for the purpose): mean
cross-entropy of the tokens at positions 0-S, S-2S, ... of 4S-token windows, as a table and a plot.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, header, table, write_json  # noqa: E402

import seekmoe  # noqa: E402
from seekmoe.data import default_corpus  # noqa: E402
from seekmoe.train import load_run_config, train  # noqa: E402


@torch.no_grad()
def loss_by_position(model_dir: Path, files: list[Path], length: int, bucket: int) -> list[float]:
    """Mean next-token cross-entropy per position bucket over `length`-token windows of `files`."""
    from tokenizers import Tokenizer

    model = seekmoe.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    sums = torch.zeros(length - 1, dtype=torch.float64)
    count = 0
    for path in files:
        ids = torch.tensor(tok.encode(path.read_text(errors="replace")).ids)
        for start in range(0, len(ids) - length + 1, length):
            window = ids[start:start + length].unsqueeze(0)
            logits = model(window).logits[0, :-1].float()
            sums += torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="none").double()
            count += 1
    per_token = sums / max(count, 1)
    return [per_token[i:i + bucket].mean().item() for i in range(0, length - 1, bucket)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--seq-len", type=int, default=128, help="pretraining context S (extension to 4S)")
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--extend-steps", type=int, default=100)
    parser.add_argument("--documents", type=int, default=6, help="longest stdlib modules scored")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.preset, args.seq_len, args.pretrain_steps, args.extend_steps, args.documents = "tiny", 32, 20, 5, 2
    S, L = args.seq_len, 4 * args.seq_len
    print(header(f"context extension ({args.preset}: {args.pretrain_steps} steps at {S} tokens, plain RoPE, then "
                 f"{args.extend_steps} steps at {L} with YaRN; fp32)"))
    files = sorted(default_corpus().files, key=lambda f: f.stat().st_size)[-args.documents:]
    common = {"precision": "fp32", "batch_size": 8, "eval_every": 10**6, "save_every": 10**6}
    with tempfile.TemporaryDirectory() as tmp:
        pre, ext = Path(tmp) / "pre", Path(tmp) / "ext"
        model_config, config = load_run_config(args.preset, overrides={
            **common, "seq_len": S, "max_position_embeddings": S, "max_steps": args.pretrain_steps})
        train(model_config, config, pre, progress=False)
        model_config, config = load_run_config(None, overrides={
            **common, "batch_size": 2, "max_steps": args.extend_steps}, init_from=pre / "final", extend_context=L)
        train(model_config, config, ext, progress=False, init_from=pre / "final")
        before = loss_by_position(pre / "final", files, L, S)
        after = loss_by_position(ext / "final", files, L, S)
    rows = [["positions", "pretrained (RoPE, S)", "extended (YaRN, 4S)"]]
    for i, (b, a) in enumerate(zip(before, after)):
        rows.append([f"{i * S}-{(i + 1) * S}", f"{b:.3f}", f"{a:.3f}"])
    print(table(rows))
    print("documents: " + ", ".join(f.name for f in files))
    payload = {"preset": args.preset, "seq_len": S, "extended_to": L, "pretrain_steps": args.pretrain_steps,
               "extend_steps": args.extend_steps, "documents": [f.name for f in files], "bucket": S,
               "loss_before": before, "loss_after": after}
    write_json(RESULTS / "context.json", payload)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        x = [(i + 0.5) * S for i in range(len(before))]
        plt.figure(figsize=(6, 4))
        plt.plot(x, before, "o-", label=f"pretrained at {S} (plain RoPE)")
        plt.plot(x, after, "o-", label=f"extended to {L} (YaRN)")
        plt.axvline(S, color="gray", linestyle=":")
        plt.xlabel("position in the window (tokens)")
        plt.ylabel("cross-entropy (nats/token)")
        plt.legend()
        plt.title("validation loss by position, longest stdlib modules")
        plt.tight_layout()
        plt.savefig(RESULTS / "context.png", dpi=100)
        print(f"wrote {RESULTS / 'context.png'}")
    except ImportError:
        pass


if __name__ == "__main__":
    main()
