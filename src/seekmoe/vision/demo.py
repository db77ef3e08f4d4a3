"""`make demo-vision`: a tiny vision-language model grown from a tiny text model, on CPU in minutes.

1. Pictures the project draws itself (`seekmoe.vision_demo_data`: 1-4 coloured shapes on a grid of 28-pixel cells,
   so each merged 28-pixel patch of the tower, one image token, is one cell) and one-word questions about them: counts, the
   shape at a position, a shape's colour. Training and held-out pictures are drawn from different seeds.
2. A tiny text model (no MTP module) pretrained on the questions and answers alone (no pictures): it learns the
   language of the task and the answers' frequencies, the best it can do blind.
3. `seekmoe sft --vision-tower tiny` in LLaVA's two stages, every stage with the Muon optimizer: `align` (the
   projector alone), then `full` (projector and language model; the tower too with --train-tower). The fresh tower's
   position grid is a 2-D sine-cosine table, which keeps the cell of each image token plain through the frozen
   tower, and its projector ends in an RMSNorm at the text embeddings' scale (`projection_output_norm`).
4. The held-out accuracy of each model (greedy answer == the right word), before (the text model with a fresh tower)
   and after, printed as a table and saved in OUT/results.json; then `seekmoe analyze` on the held-out pictures'
   chats writes OUT/analysis/{report.html,analysis.json} with the routing per modality (image vs text tokens).

    python -m seekmoe.vision.demo --out runs/demo-vision
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ..vision_demo_data import question_kind, write_chat_dataset

KINDS = ("count", "position", "colour")
CELL = 28  # pixels a grid cell: one merged 2 x 2 block of the tower's 14-pixel patches, one image token


def text_records(records: Sequence[dict]) -> list[dict]:
    """The chats with their image parts left out: what a text model can be pretrained on."""
    out = []
    for r in records:
        messages = []
        for m in r["messages"]:
            content = m["content"]
            if isinstance(content, list):
                content = "".join(p["text"] for p in content if p.get("type") == "text")
            messages.append({"role": m["role"], "content": content})
        out.append({"messages": messages})
    return out


def read_records(path: Path) -> list[dict]:
    """The JSON records of a JSONL file."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def make_text_model(folder: Path, texts: list[str], preset: str = "tiny", seed: int = 0, **fields) -> Path:
    """A fresh `preset` text model with a byte-level BPE tokenizer trained on `texts`, whose last vocabulary id is
    kept free as the image placeholder (config `media_placeholder_token_id`), so the grown vision-language model's
    language model knows which of its tokens are image tokens (modality-aware routing, `seekmoe analyze`)."""
    from .. import build_model
    from ..config import ModelConfig
    from ..data import train_tokenizer
    from ..inference.tokenizer import write_tokenizer_files

    config = ModelConfig.preset(preset, **fields)
    config = ModelConfig.preset(preset, **{**fields, "media_placeholder_token_id": config.vocab_size - 1})
    tokenizer = train_tokenizer(texts, config.vocab_size - 1)
    torch.manual_seed(seed)
    build_model(config).save_pretrained(folder)
    write_tokenizer_files(tokenizer, folder, config.max_position_embeddings)
    return folder


@torch.no_grad()
def accuracy(model, folder: Path, records: Sequence[dict], image_dir: Path, batch_size: int = 32) -> dict:
    """Held-out accuracy of the vision-language `model` (the tokenizer is `folder`'s): a question counts as right
    when greedy decoding would write exactly its answer and end the turn, i.e. every answer token (and the
    end-of-text) is the argmax after the tokens before it. Overall and per question kind."""
    from ..inference.tokenizer import Tokenizer
    from ..posttrain.sft_data import IGNORE
    from .preprocess import ImageProcessor
    from .sft import render_vision_example

    model.eval()
    config = model.config
    tokenizer = Tokenizer(folder, config.bos_token_id, config.eos_token_id)
    processor = ImageProcessor(patch_size=config.vision_config.patch_size,
                               merge_size=config.vision_config.merge_kernel_size[0])
    examples = [render_vision_example(r, tokenizer, config, processor, image_dir) for r in records]
    kinds = [question_kind(r["messages"][0]["content"][1]["text"].lower()) for r in records]
    right = [False] * len(examples)
    by_length: dict[int, list[int]] = {}
    for i, e in enumerate(examples):  # equal lengths batch without padding
        by_length.setdefault(len(e.ids), []).append(i)
    for group in by_length.values():
        for start in range(0, len(group), batch_size):
            chunk = group[start:start + batch_size]
            ids = torch.tensor([examples[i].ids for i in chunk])
            labels = torch.tensor([examples[i].labels for i in chunk])
            pixels = torch.cat([examples[i].pixel_values for i in chunk])
            grid = torch.cat([examples[i].image_grid_thw for i in chunk])
            predicted = model(ids, pixel_values=pixels, image_grid_thw=grid).logits[:, :-1].argmax(-1)
            target = labels[:, 1:]
            ok = ((predicted == target) | (target == IGNORE)).all(dim=1)
            for i, good in zip(chunk, ok.tolist()):
                right[i] = good
    result = {"all": sum(right) / len(right)}
    for kind in KINDS:
        hits = [ok for ok, k in zip(right, kinds) if k == kind]
        result[kind] = sum(hits) / len(hits) if hits else float("nan")
    return result


def table(rows: list[tuple[str, dict]]) -> str:
    """The before/after table as Markdown: model, held-out accuracy overall and per question kind."""
    lines = ["| model | held-out accuracy | count | position | colour |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {name} | {acc['all']:.3f} | " + " | ".join(f"{acc[k]:.3f}" for k in KINDS) + " |"
              for name, acc in rows]
    return "\n".join(lines)


def plot_modality(analysis: dict, path: Path) -> Path | None:
    """The routing-per-modality picture: for each MoE layer, every expert's share of the image tokens' and of the
    text tokens' routed slots, from analysis.json's `modality` entry. None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no picture (pip install 'seekmoe[plots]')")
        return None
    layers = analysis["modality"]["layers"]
    fig, axes = plt.subplots(1, len(layers), figsize=(5 * len(layers), 3.2), squeeze=False)
    for ax, layer in zip(axes[0], layers):
        E = len(layer["load"]["image"])
        xs = range(E)
        ax.bar([x - 0.2 for x in xs], layer["load"]["image"], 0.4, label="image tokens", color="#e4572e")
        ax.bar([x + 0.2 for x in xs], layer["load"]["text"], 0.4, label="text tokens", color="#4c78a8")
        ax.axhline(1 / E, color="grey", lw=0.8, ls="--")
        ax.set_title(f"MoE layer {layer['layer']}: JS divergence {layer['js_divergence']:.2f} bits", fontsize=10)
        ax.set_xlabel("routed expert")
        ax.set_xticks(list(xs))
    axes[0][0].set_ylabel("share of the modality's slots")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    """Pictures -> text model -> align -> full; prints and saves the before/after table, then analyzes routing."""
    import argparse

    from .. import from_pretrained
    from ..analysis.cli import add_analyze_arguments, run_analyze
    from ..inference.chat_template import format_chat
    from ..posttrain.sft import sft
    from .sft import attach_vision_tower

    p = argparse.ArgumentParser(prog="python -m seekmoe.vision.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo-vision", help="where the data, the runs and the analysis go")
    p.add_argument("--scenes", type=int, default=1500, help="training pictures (3 questions each)")
    p.add_argument("--held-out", type=int, default=200, help="held-out pictures (3 questions each)")
    p.add_argument("--text-steps", type=int, default=100, help="text pretraining steps (questions and answers)")
    p.add_argument("--align-steps", type=int, default=50, help="LLaVA stage 1: the projector alone")
    p.add_argument("--full-steps", type=int, default=3000,
                   help="LLaVA stage 2: projector and language model (the tower too with --train-tower)")
    p.add_argument("--grid", type=int, default=3, help="cells a picture side (1 to grid*grid - 1 shapes)")
    # Aligning at a pretraining-like lr blew the fresh projector's outputs up (norms x40 in 100 steps; AdamW, before
    # projection_output_norm) into one constant vector that drowned what differs between cells.
    p.add_argument("--align-lr", type=float, default=3e-4, help="learning rate of the align stage (small: see above)")
    # The same for the full stage: at 5e-3 the projected features grew to ~100x the text embeddings, nearly one vector,
    # and the language model learned to ignore the image tokens; at 3e-3 (AdamW, with the output norm) the answers
    # still stayed at the blind guess.
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of the full stage")
    p.add_argument("--train-tower", action="store_true",
                   help="train the vision tower in the full stage too (default: frozen, as LLaVA does)")
    p.add_argument("--batch-size", type=int, default=8, help="packed rows of 128 tokens a step (~4 questions each)")
    # With AdamW (lr 5e-4 to 3e-3, up to 3000 full steps) position and colour stayed near their blind levels (at
    # best 0.40 and 0.71 against 0.36 and 0.25); with Muon all three kinds pass 0.9 (benchmarks/README.md).
    p.add_argument("--optimizer", choices=("muon", "adamw"), default="muon",
                   help="optimizer of every stage: muon (Muon on hidden matrices, AdamW on the rest) or adamw")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = Path(args.out)
    torch.set_num_threads(1)  # a tiny model gains nothing from a second thread, and loses much on a busy CPU
    started = time.perf_counter()

    if not 2 <= args.grid <= 8:
        p.error(f"--grid {args.grid}: expected 2 to 8 cells a side")
    shapes = {"grid": args.grid, "max_objects": min(4, args.grid ** 2 - 1), "size": CELL * args.grid}
    train_path = write_chat_dataset(out / "data" / "train", args.scenes, 3, seed=args.seed, **shapes)
    held_path = write_chat_dataset(out / "data" / "held-out", args.held_out, 3, seed=args.seed + 1000, **shapes)
    image_dir = out / "data"
    train, held = read_records(train_path), read_records(held_path)
    text_path = out / "data" / "text.jsonl"
    text_path.write_text("".join(json.dumps(r) + "\n" for r in text_records(train)))
    texts = [format_chat(r["messages"][:1]) + " " + r["messages"][1]["content"] for r in text_records(train)]
    # No MTP module: the run is ~1.45x faster without it, time spent on more full steps instead (the position
    # questions are the last to be learned; benchmarks/README.md compares the two).
    base = make_text_model(out / "base", texts, seed=args.seed, num_nextn_predict_layers=0)
    # fp32: the same run on every CPU (precision "auto" would autocast to bf16 where the CPU computes it natively)
    common = {"seq_len": 128, "batch_size": args.batch_size, "warmup_steps": 10, "eval_every": 10 ** 6,
              "num_threads": 1, "seed": args.seed, "precision": "fp32", "optimizer": args.optimizer}
    print(f"text pretraining: {args.text_steps} steps on the questions and answers alone", flush=True)
    sft(base, [text_path], out / "text", {**common, "max_steps": args.text_steps, "lr": 3e-3,
                                          "save_every": args.text_steps}, progress=False)
    text_model = out / "text" / "final"

    torch.manual_seed(args.seed)
    rows = [("text model + fresh tower (before)", accuracy(attach_vision_tower(text_model, "tiny"), text_model,
                                                            held, image_dir))]
    print(f"LLaVA stage 1 (align): {args.align_steps} steps", flush=True)
    sft(text_model, [train_path], out / "align", {**common, "max_steps": args.align_steps, "lr": args.align_lr,
                                                   "save_every": args.align_steps},
        progress=False, vision_tower="tiny", stage="align", image_dir=image_dir)
    rows.append(("after align (projector)", accuracy(from_pretrained(out / "align" / "final", dtype=torch.float32),
                                                     text_model, held, image_dir)))
    print(f"LLaVA stage 2 (full): {args.full_steps} steps", flush=True)
    sft(out / "align" / "final", [train_path], out / "full", {**common, "max_steps": args.full_steps, "lr": args.lr,
                                                               "save_every": args.full_steps},
        progress=False, stage="full", train_vision_tower=args.train_tower, image_dir=image_dir)
    final = out / "full" / "final"
    rows.append(("after align + full", accuracy(from_pretrained(final, dtype=torch.float32), text_model, held,
                                                image_dir)))
    seconds = time.perf_counter() - started
    text = table(rows)
    n = len(held)
    print(f"\nquestions about {args.held_out} held-out pictures ({n} questions), {seconds:.0f} s in all:\n{text}")

    (out / "results.json").write_text(json.dumps(
        {"rows": [{"model": name, **acc} for name, acc in rows], "held_out_questions": n, "seconds": seconds,
         "steps": {"text": args.text_steps, "align": args.align_steps, "full": args.full_steps},
         "align_lr": args.align_lr, "full_lr": args.lr, "optimizer": args.optimizer, "grid": args.grid},
        indent=2) + "\n")
    analyze_parser = argparse.ArgumentParser()
    add_analyze_arguments(analyze_parser)
    run_analyze(analyze_parser.parse_args(["--model", str(final), "--data", str(held_path), "--out",
                                           str(out / "analysis"), "--probe-tokens", "0", "--no-progress"]))
    picture = plot_modality(json.loads((out / "analysis" / "analysis.json").read_text()), out / "modality.png")
    if picture is not None:
        print(f"wrote {picture} (per-expert load from image and from text tokens)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
