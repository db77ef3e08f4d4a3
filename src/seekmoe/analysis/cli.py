"""`seekmoe analyze`: route held-out text through a trained model and write `OUT/report.html` (self-contained) and
`OUT/analysis.json` (every number)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from .analyze import analyze
from .report import render_report
from .sources import load_sources

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
REPORT_NAME, JSON_NAME = "report.html", "analysis.json"


def add_analyze_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="DIR", required=True,
                   help="a model directory: config.json, safetensors weights and tokenizer.json (a vision-language "
                        "model too: its routing per modality, image vs text tokens)")
    p.add_argument("--data", metavar="PATH", nargs="+", required=True,
                   help="held-out text, one source per path (file, folder, .jsonl or .parquet); several sources are "
                        "compared for domain specialization; for a vision-language model, a .jsonl of chats whose "
                        "user turns hold image parts (as `seekmoe sft` reads them; file:// pictures under its folder)")
    p.add_argument("--out", metavar="DIR", required=True, help=f"folder for {REPORT_NAME} and {JSON_NAME}")
    p.add_argument("--prompt", metavar="TEXT", help="show each token of TEXT with its experts per layer")
    p.add_argument("--compare", metavar="CHECKPOINT",
                   help="an earlier checkpoint of the same run (OUT/checkpoints/step-N, or a model directory): router "
                        "saturation against it")
    p.add_argument("--max-tokens", type=int, default=16384, metavar="N",
                   help="tokens read from each source at most (default 16384)")
    p.add_argument("--probe-tokens", type=int, default=4096, metavar="N",
                   help="tokens of each source the ablation probes score, each probe one pass (default 4096; "
                        "0 skips the probes)")
    p.add_argument("--seq-len", type=int, default=None, metavar="N",
                   help="tokens per sequence (default: 256, or the model's context if shorter)")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="sequences per forward (default 8)")
    p.add_argument("--top-tokens", type=int, default=8, metavar="N", help="tokens listed per expert (default 8)")
    p.add_argument("--min-count", type=int, default=5, metavar="N",
                   help="occurrences a token needs for its routing concentration to count (default 5)")
    p.add_argument("--modality-token-id", type=int, default=None, metavar="ID",
                   help="report routing per modality, counting tokens with this id as image tokens and the rest as "
                        "text (default: the model's media_placeholder_token_id, reported when the data holds it); "
                        "--data may be a .jsonl of token ids ({\"input_ids\": [...]} per line) to hold such tokens")
    p.add_argument("--data-glob", default="*", metavar="GLOB", help="files to read inside --data folders")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weight type (default float32)")
    p.add_argument("--device", default="cpu", help="torch device to run on (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _positive(name: str, value: int, minimum: int = 1) -> int:
    if value < minimum:
        raise ValueError(f"{name} {value}: expected an integer >= {minimum}")
    return value


def run_analyze(args: argparse.Namespace) -> int:
    from ..checkpoint import from_pretrained
    from ..inference.tokenizer import Tokenizer
    from ..train.export import checkpoint_model, is_training_checkpoint

    for name, value, minimum in (("--batch-size", args.batch_size, 1), ("--top-tokens", args.top_tokens, 1),
                                 ("--min-count", args.min_count, 1), ("--probe-tokens", args.probe_tokens, 0)):
        _positive(name, value, minimum)
    if args.modality_token_id is not None:
        _positive("--modality-token-id", args.modality_token_id, 0)
    for flag, path in (("--model", args.model), ("--compare", args.compare)):
        if path is not None and not Path(path).is_dir():
            raise FileNotFoundError(f"{flag} {path}: no such model directory")
    started = time.perf_counter()
    model = from_pretrained(args.model, dtype=DTYPES[args.dtype], device=args.device).eval()
    tokenizer = Tokenizer(args.model, model.config.bos_token_id, model.config.eos_token_id)
    # a vision-language model (its config has the language model's as text_config, and an image_processor()):
    # its data may be chats with pictures
    vision = getattr(model.config, "text_config", None) is not None
    vocab_size = (model.config.text_config if vision else model.config).vocab_size
    seq_len = args.seq_len or min(256, model.config.max_position_embeddings)
    if seq_len > model.config.max_position_embeddings:
        raise ValueError(f"--seq-len {seq_len}: longer than the model's context "
                         f"(max_position_embeddings={model.config.max_position_embeddings})")
    if args.modality_token_id is not None and args.modality_token_id >= vocab_size:
        raise ValueError(f"--modality-token-id {args.modality_token_id}: expected a token id below the model's "
                         f"vocab_size={vocab_size}")
    sources = load_sources(args.data, tokenizer, seq_len, args.max_tokens, vocab_size, args.data_glob,
                           vision_config=model.config if vision else None)
    compare = None
    if args.compare and is_training_checkpoint(args.compare):  # OUT/checkpoints/step-N of a run
        compare = checkpoint_model(args.compare).to(dtype=DTYPES[args.dtype], device=args.device).eval()
    elif args.compare:
        compare = from_pretrained(args.compare, dtype=DTYPES[args.dtype], device=args.device).eval()
    results = analyze(model, tokenizer, sources, args.batch_size, prompt=args.prompt, compare=compare,
                      compare_name=args.compare, probe_tokens=args.probe_tokens, top_tokens=args.top_tokens,
                      min_count=args.min_count, progress=not args.no_progress,
                      modality_token_id=args.modality_token_id)
    results["model"]["path"] = str(args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / JSON_NAME).write_text(json.dumps(results, indent=1) + "\n")
    (out / REPORT_NAME).write_text(render_report(results, f"seekmoe routing analysis: {args.model}"),
                                   encoding="utf-8")
    vio = [s["max_vio"] for s in results["layers"]]
    print(f"loss {results['loss']:.4f} over {sum(s.tokens for s in sources)} tokens of {len(sources)} source(s); "
          f"MaxVio per MoE layer {', '.join(f'{v:.3f}' for v in vio)}; {time.perf_counter() - started:.1f}s")
    if "modality" in results:
        m = results["modality"]
        js = ", ".join(f"{layer['js_divergence']:.3f}" for layer in m["layers"])
        print(f"per modality: {m['tokens']['image']} image and {m['tokens']['text']} text tokens (image id "
              f"{m['image_token_id']}); Jensen-Shannon divergence of their loads per MoE layer {js}"
              + ("" if m["tokens"]["image"] else f" (no token of the data has id {m['image_token_id']})"))
    print(f"wrote {out / REPORT_NAME} and {out / JSON_NAME}")
    return 0
