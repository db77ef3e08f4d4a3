"""`make demo-post`: a tiny model learns a task's format by SFT, then improves on it by GRPO, on CPU in minutes.

`make_base_model` also gives the tests their starting point: a randomly initialized tiny model with a tokenizer
trained on the task's own text (no download, no pretraining run).
"""

from __future__ import annotations

from pathlib import Path

import torch


def make_base_model(folder: str | Path, texts: list[str], preset: str = "tiny", seed: int = 0, **fields) -> Path:
    """Write a model folder (config, weights, tokenizer files) of a freshly initialized `preset` model whose
    byte-level BPE tokenizer is trained on `texts`; ModelConfig `fields` override the preset's."""
    from .. import build_model
    from ..config import ModelConfig
    from ..data import train_tokenizer
    from ..inference.tokenizer import write_tokenizer_files

    folder = Path(folder)
    config = ModelConfig.preset(preset, **fields)
    tokenizer = train_tokenizer(texts, config.vocab_size)
    torch.manual_seed(seed)
    build_model(config).save_pretrained(folder)
    write_tokenizer_files(tokenizer, folder, config.max_position_embeddings)
    return folder


def table(rows: list[tuple[str, float, float]]) -> str:
    """The before/after table as Markdown: stage, greedy exact-match accuracy, sampled mean reward."""
    lines = ["| model | held-out accuracy (greedy) | held-out mean reward (sampled, T=1) |", "|---|---:|---:|"]
    lines += [f"| {name} | {acc:.3f} | {reward:.3f} |" for name, acc, reward in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Base model -> SFT -> GRPO on the arithmetic task, printing and saving (OUT/results.json) the table."""
    import argparse
    import json
    import time

    from .. import from_pretrained
    from ..inference.chat_template import format_chat
    from ..inference.tokenizer import Tokenizer
    from .evaluate import score_task
    from .rl import rl
    from .sft import sft
    from .tasks import ChainSum, sft_records

    p = argparse.ArgumentParser(prog="python -m seekmoe.posttrain.demo", description=__doc__)
    p.add_argument("--out", default="runs/demo-post", help="where the base, sft and rl runs go")
    p.add_argument("--sft-steps", type=int, default=100, help="short: SFT teaches the format, GRPO the rest")
    p.add_argument("--rl-steps", type=int, default=100)
    p.add_argument("--held-out", type=int, default=200, help="held-out prompts the table is measured on")
    args = p.parse_args(argv)
    out = Path(args.out)
    torch.set_num_threads(1)  # a 0.2M-parameter model gains nothing from a second thread, and loses much on a busy CPU
    task = ChainSum(terms=2, max_value=4)
    task_options = {"task": {"terms": 2, "max_value": 4}}
    records = sft_records(task, 2000, seed=1)
    texts = [format_chat([{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}])
             for r in records]
    base = make_base_model(out / "base", texts)
    (out / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    held = task.prompts(args.held_out, seed=12345)
    tok = Tokenizer(base)

    def measure(folder: Path) -> tuple[float, float]:
        model = from_pretrained(folder)
        greedy = score_task(model, tok, task, held, max_new_tokens=8)["mean_reward"]
        sampled = score_task(model, tok, task, held, max_new_tokens=8, temperature=1.0, seed=7)["mean_reward"]
        return greedy, sampled

    t0 = time.perf_counter()
    rows = [("base (random init)", *measure(base))]
    sft(base, [out / "sft.jsonl"], out / "sft", {"max_steps": args.sft_steps, "lr": 6e-3, "seq_len": 64,
                                                 "batch_size": 8, "warmup_steps": 5, "eval_every": 100,
                                                 "save_every": args.sft_steps, "num_threads": 1})
    rows.append(("after SFT", *measure(out / "sft" / "final")))
    rl(out / "sft" / "final", "arithmetic", out / "rl", {**task_options, "max_steps": args.rl_steps, "lr": 5e-4,
                                                          "beta": 0.04, "prompts_per_step": 32,
                                                          "save_every": args.rl_steps, "num_threads": 1})
    rows.append(("after SFT + GRPO", *measure(out / "rl" / "final")))
    seconds = time.perf_counter() - t0
    text = table(rows)
    print(f"\narithmetic task ({task.terms} terms in [0, {task.max_value}]), {len(held)} held-out prompts, "
          f"{seconds:.0f} s in all:\n{text}")
    (out / "results.json").write_text(json.dumps({"rows": rows, "seconds": seconds, "sft_steps": args.sft_steps,
                                                  "rl_steps": args.rl_steps}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
