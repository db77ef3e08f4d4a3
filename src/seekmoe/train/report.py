"""After a run: a summary table of what was trained and how well, and a greedy completion by the final model.

`python -m seekmoe.train.report OUT [--prompt TEXT]` prints both (this is how `make demo` ends).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

DEFAULT_PROMPT = "def __init__(self, name, value=None):\n        "


def format_summary(summary: dict) -> str:
    """A two-column table of a run's summary.json."""
    val = summary["final_val_loss"]
    data = summary["data"]
    rows = [
        ("total parameters", f"{summary['total_params'] / 1e6:.2f}M ({summary['total_params']:,})"),
        ("activated per token", f"{summary['active_params'] / 1e6:.2f}M ({summary['active_params']:,})"),
        ("corpus", _shorten(data["corpus"], 60)),
        ("documents (train / validation)", f"{data['train']['documents']} / {data['val']['documents']}"),
        ("tokens (train / validation)", f"{data['train']['tokens']:,} / {data['val']['tokens']:,}"),
        ("tokenizer training / tokenizing", f"{data['tokenizer_s']:.1f} s / {data['tokenize_s']:.1f} s"
                                            + (" (cached)" if data["tokenize_s"] == 0 else "")),
        ("steps, tokens trained", f"{summary['steps']}, {summary['tokens_trained']:,}"),
        ("training time", f"{summary['train_seconds'] / 60:.1f} min on {summary['device']} ({summary['precision']})"),
        ("tokens/s", f"{summary['tokens_per_s']:,.0f}"),
        ("final train loss (last 10 steps)", f"{summary['final_train_loss']:.3f} nats/token"),
        ("final validation loss", "n/a" if val is None else f"{val:.3f} nats/token"),
        ("unigram entropy of the corpus", f"{summary['unigram_entropy']:.3f} nats/token"),
        ("MaxVio (mean over layers / worst)", f"{summary['max_vio']:.3f} / {summary['max_vio_worst']:.3f}"),
        ("model", summary["model_dir"]),
    ]
    width = max(len(k) for k, _ in rows)
    rule = "-" * (width + 2 + max(len(v) for _, v in rows))
    return "\n".join([rule, *(f"{k:<{width}}  {v}" for k, v in rows), rule])


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def greedy_completion(model_dir: Path, prompt: str, max_new_tokens: int = 64) -> str:
    """The model's most likely continuation of `prompt` (stopping at end-of-text), by the inference engine."""
    from ..inference import Engine, SamplingParams

    engine = Engine.from_pretrained(model_dir, dtype=torch.float32, max_batch_size=1)
    request = engine.generate([engine.tokenizer.encode(prompt)],
                              SamplingParams(max_new_tokens=max_new_tokens, temperature=0))[0]
    return request.text


def main(argv: list[str] | None = None) -> int:
    """Print the summary table of a `seekmoe train --out` folder and its final model's greedy completion."""
    from .trainer import SUMMARY_FILE

    parser = argparse.ArgumentParser(prog="python -m seekmoe.train.report", description=__doc__.splitlines()[0])
    parser.add_argument("out", metavar="DIR", help="a finished `seekmoe train --out` folder")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="the text the model completes (default: a code line)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if not (out / SUMMARY_FILE).is_file():
        print(f"error: no {SUMMARY_FILE} in {out}: the run has not finished", file=sys.stderr)
        return 2
    print(format_summary(json.loads((out / SUMMARY_FILE).read_text())))
    completion = greedy_completion(out / "final", args.prompt, args.max_new_tokens)
    print("greedy completion by the trained model (prompt, then >>> continuation <<<):")
    print(f"{args.prompt}>>>{completion}<<<")
    return 0


if __name__ == "__main__":
    sys.exit(main())
