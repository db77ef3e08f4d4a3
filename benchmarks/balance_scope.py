"""Global-batch vs micro-batch balance statistics (issue 16; "Demons in the Detail", Qwen 2025): the same model
trained twice with the expert-level balance loss alone balancing it (auxiliary-loss-free bias off), counting f_i
over each micro-batch (`balance_scope=micro`) or over every micro-batch of the step (`global`).

    python benchmarks/balance_scope.py              # small preset, 300 steps each, a few minutes
    python benchmarks/balance_scope.py --quick      # tiny preset, 30 steps

Reports validation loss, MaxVio (mean of the last 10 steps) and expert specialisation by domain: held-out text of
several standard-library packages is routed through each final model; for each MoE layer and domain, the total
variation distance between the domain's expert-load distribution and the all-domain one (mean over layers and
domains: 0 = every domain uses the experts alike), and the share of (layer, expert) pairs that some domain loads at
more than twice its fair share.
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
from seekmoe.train.metrics import read_metrics  # noqa: E402

DOMAINS = ("email", "asyncio", "xml", "unittest", "json", "multiprocessing", "tkinter", "idlelib")


def domain_texts(max_chars: int) -> dict[str, str]:
    """Up to `max_chars` of source per standard-library package that exists here."""
    root = Path(default_corpus().files[0]).parent
    while root.name != "lib" and not (root / "os.py").is_file():
        root = root.parent
    out = {}
    for name in DOMAINS:
        files = sorted((root / name).rglob("*.py")) if (root / name).is_dir() else []
        text = "".join(f.read_text(errors="replace") for f in files[-6:])[:max_chars]
        if text:
            out[name] = text
    return out


@torch.no_grad()
def specialisation(model_dir: Path, texts: dict[str, str], seq_len: int) -> tuple[float, float]:
    """(mean total-variation distance of domain vs overall expert load, share of experts some domain loads > 2x)."""
    from tokenizers import Tokenizer

    model = seekmoe.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    n_main = model.config.n_moe_layers
    loads = {}
    for name, text in texts.items():
        ids = torch.tensor(tok.encode(text).ids)
        n = len(ids) // seq_len * seq_len
        batch = ids[:n].view(-1, seq_len)
        counts = model(batch, labels=batch).expert_counts[:n_main].double()  # [layers, E]
        loads[name] = counts / counts.sum(-1, keepdim=True)
    overall = torch.stack(list(loads.values())).mean(0)
    tv = torch.stack([0.5 * (p - overall).abs().sum(-1) for p in loads.values()]).mean().item()
    fair = 1.0 / overall.shape[-1]
    hot = (torch.stack(list(loads.values())) > 2 * fair).any(0).double().mean().item()
    return tv, hot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--alpha", type=float, default=0.03, help="expert_balance_alpha")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.preset, args.steps = "tiny", 30
    seq_len = 128
    print(header(f"balance_scope micro vs global ({args.preset}, {args.steps} steps, grad_accum 4 x 2 sequences "
                 f"of {seq_len}, fp32, expert_balance_alpha={args.alpha}, aux_loss_alpha=0, bias update off)"))
    texts = domain_texts(40_000)
    rows = [["balance_scope", "val loss", "MaxVio (last 10)", "domain TV distance", "experts > 2x fair share"]]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for scope in ("micro", "global"):
            model_config, config = load_run_config(args.preset, overrides={
                "balance_scope": scope, "expert_balance_alpha": args.alpha, "aux_loss_alpha": 0.0,
                "bias_update_speed": 0.0, "grad_accum": 4, "batch_size": 2, "seq_len": seq_len,
                "max_steps": args.steps, "eval_every": args.steps, "save_every": args.steps, "precision": "fp32",
                "warmup_steps": min(20, args.steps // 5)})
            out = Path(tmp) / scope
            summary = train(model_config, config, out, progress=False)
            records = read_metrics(out)
            vio = sum(r["max_vio"] for r in records[-10:]) / len(records[-10:])
            tv, hot = specialisation(out / "final", texts, seq_len)
            results[scope] = {"val_loss": summary["final_val_loss"], "max_vio": vio, "domain_tv": tv,
                              "hot_expert_share": hot}
            rows.append([scope, f"{summary['final_val_loss']:.3f}", f"{vio:.3f}", f"{tv:.3f}", f"{hot:.0%}"])
    print(table(rows))
    print(f"domains: {', '.join(texts)}")
    write_json(RESULTS / "balance_scope.json", {"preset": args.preset, "steps": args.steps, "alpha": args.alpha,
                                                "domains": list(texts), "results": results})


if __name__ == "__main__":
    main()
