"""A model larger than memory, decoded from memory-mapped weights: a DeepSeek-V2-Lite-shaped model (15.7B parameters,
its exact config.json shapes; 31 GB in bf16) with random weights, written layer by layer (never all in memory), then
decoded by `seekmoe generate` in a fresh process, once per variant: bf16 weights mapped from the files (`--mmap`),
int4 quantized while loading from them (`--mmap --quantize int4`), and what a user does once: `seekmoe quantize
--scheme int4` into a folder that fits in memory, decoded eager (and compiled with --compiled). Prints tokens/s,
peak resident memory and the private (anonymous) part of it, and writes JSON.

    python benchmarks/big_model.py --layers 3                  # a 3-layer slice (~3.7 GB): minutes
    python benchmarks/big_model.py                             # all 27 layers, 31 GB on disk (deleted afterwards)
    python benchmarks/big_model.py --keep --compiled           # + the compiled int4 run; keep both folders

Each run starts cold: the page cache of the model's own files is dropped first (posix_fadvise DONTNEED, which
touches no other file), so the first tokens read their experts from the disk as a fresh process would.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, header, table, write_json  # noqa: E402

from seekmoe import CausalLM, ModelConfig  # noqa: E402
from seekmoe.checkpoint import INDEX_NAME, disk_items  # noqa: E402
from seekmoe.mapped_weights import write_items  # noqa: E402

PROMPT = "def fibonacci(n):\n    "


def v2_lite_config(layers: int) -> ModelConfig:
    """DeepSeek-V2-Lite's config.json (hidden 2048, 64 routed + 2 shared experts top-6, expert width 1408,
    kv_lora_rank 512, no query compression, first layer dense, vocab 102400), cut to `layers` layers; BOS/EOS
    are our tokenizer's ids 0 and 1."""
    return ModelConfig.preset("deepseek-v2-lite", num_hidden_layers=layers, bos_token_id=0, eos_token_id=1)


def write_model(folder: Path, config: ModelConfig, seed: int = 0) -> int:
    """Write `config` with random bf16 weights (normal, std initializer_range; norms 1) to `folder`, one shard per
    layer plus one for the embedding, final norm and head; returns the bytes written. Holds one layer at a time."""
    from seekmoe.data.tokenizer import train_tokenizer
    from seekmoe.inference.tokenizer import write_tokenizer_files

    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    # Drawing 15.7B normal numbers takes longer than writing them: every matrix is cut from one pool of 64M draws
    # at random offsets instead (memcpy speed). Experts and heads still differ, which is all routing needs here.
    pool = torch.empty(2**26, dtype=torch.bfloat16).normal_(0.0, config.initializer_range, generator=gen)
    with torch.device("meta"):
        model = CausalLM(config).to(torch.bfloat16)
    pieces: list[tuple[str, torch.nn.Module]] = [("model.layers.%d." % i, layer)
                                                 for i, layer in enumerate(model.model.layers)]
    top = torch.nn.ModuleDict({"embed_tokens": model.model.embed_tokens, "norm": model.model.norm})
    pieces.insert(0, ("model.", top))
    pieces.append(("", torch.nn.ModuleDict({"lm_head": model.lm_head})))
    weight_map, total = {}, 0
    for n, (prefix, module) in enumerate(pieces):
        start = time.perf_counter()
        module.to_empty(device="cpu")
        with torch.no_grad():
            for name, p in list(module.named_parameters()) + list(module.named_buffers()):
                if p.dim() >= 2:
                    _fill(p, pool, gen)
                else:  # RMSNorm weights (and a selection bias, if any)
                    p.fill_(1.0 if name.endswith("norm.weight") or "layernorm" in name else 0.0)
        state = {prefix + k: v for k, v in module.state_dict().items()}
        items = list(disk_items(state, config))
        shard = f"model-{n + 1:05d}-of-{len(pieces):05d}.safetensors"
        write_items(folder / shard, items, metadata={"format": "pt"})
        size = sum(t.numel() * t.element_size() for _, t in items)
        total += size
        weight_map.update({k: shard for k, _ in items})
        module.to_empty(device="meta")  # free this piece before the next
        print(f"  wrote {shard} ({size / 2**30:.2f} GiB) in {time.perf_counter() - start:.1f}s", flush=True)
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config.save(folder)
    corpus = [Path(__file__).read_text()] * 4
    write_tokenizer_files(train_tokenizer(corpus, 400), folder, config.max_position_embeddings)
    return total


def _fill(p: torch.Tensor, pool: torch.Tensor, gen: torch.Generator) -> None:
    """`p` (contiguous) filled with slices of `pool` taken at random offsets."""
    flat, chunk = p.view(-1), len(pool) // 2
    for i in range(0, flat.numel(), chunk):
        m = min(chunk, flat.numel() - i)
        o = int(torch.randint(0, len(pool) - m + 1, (1,), generator=gen))
        flat[i:i + m].copy_(pool[o:o + m])


def drop_page_cache(folder: Path) -> None:
    """Evict the clean page-cache pages of the model's own files (no other file is touched)."""
    for file in folder.glob("*.safetensors"):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def has_quantize_flag() -> bool:
    """Whether this seekmoe's `generate` takes --quantize (issue 24's quantization, from another branch)."""
    out = subprocess.run([sys.executable, "-m", "seekmoe", "generate", "--help"], capture_output=True, text=True)
    return "--quantize" in out.stdout


def quantize_folder(folder: Path, out: Path, scheme: str, threads: int) -> dict:
    """`seekmoe quantize` of the (mapped) bf16 folder into `out`, cold; its wall time and peak resident memory."""
    drop_page_cache(folder)
    shutil.rmtree(out, ignore_errors=True)
    code = ("import resource, sys; from seekmoe.cli import main; rc = main(sys.argv[1:]); "
            "print(f'peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB', file=sys.stderr); "
            "sys.exit(rc)")
    cmd = [sys.executable, "-c", code, "quantize", "--model", str(folder), "--scheme", scheme, "--out", str(out)]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"seekmoe quantize failed:\n{done.stderr[-2000:]}")
    print(f"seekmoe quantize --scheme {scheme}:", *done.stderr.strip().splitlines()[-2:], sep="\n  ", flush=True)
    peak = float(re.search(r"peak RSS ([\d.]+) GiB", done.stderr).group(1))
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    return {"wall_s": round(wall, 1), "peak_rss_gib": peak, "bytes": size}


def decode(folder: Path, tokens: int, threads: int, extra: list[str], mmap: bool = True) -> dict:
    """One cold `seekmoe generate --stats` run (`--mmap` unless told not to); its tokens/s and memory lines."""
    drop_page_cache(folder)
    cmd = [sys.executable, "-m", "seekmoe", "generate", "--model", str(folder), *(["--mmap"] if mmap else []),
           "--prompt", PROMPT, "--max-new-tokens", str(tokens), "--ignore-eos", "--temperature", "0", "--stats",
           *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    print(f"generate {' '.join(extra)}{' --mmap' if mmap else ''}:", *out.stderr.strip().splitlines()[-4:],
          sep="\n  ", flush=True)
    speed = re.search(r"(\d+) tokens in ([\d.]+)s \(([\d.]+) tokens/s\)", out.stderr)
    mem = re.search(r"peak RSS ([\d.]+) GiB, RSS now ([\d.]+) GiB \(([\d.]+) private, ([\d.]+) file pages\)",
                    out.stderr)
    compiling = re.search(r"including ([\d.]+)s compiling", out.stderr)
    compile_s = float(compiling.group(1)) if compiling else 0.0
    tokens, seconds = int(speed.group(1)), float(speed.group(2))
    # the request's tokens over its time, prompt included, compiling not (the CLI rounds to 0.1 tokens/s)
    return {"command": " ".join(cmd), "tokens": tokens, "decode_s": seconds, "compile_s": compile_s,
            "tokens_per_s": tokens / (seconds - compile_s), "peak_rss_gib": float(mem.group(1)),
            "rss_end_gib": float(mem.group(2)), "private_gib": float(mem.group(3)),
            "file_pages_gib": float(mem.group(4)), "process_wall_s": round(wall, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=27, help="decoder layers (default 27: the whole V2-Lite)")
    p.add_argument("--folder", type=Path, default=Path("/tmp/seekmoe-big-model"),
                   help="where the model is written (deleted afterwards unless --keep)")
    p.add_argument("--tokens", type=int, default=16, help="tokens decoded per run (default 16)")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the decoding process (default 2)")
    p.add_argument("--quantize", choices=("none", "int4", "int8"), default="int4",
                   help="also decode with --quantize SCHEME where seekmoe has the flag (default int4; none: skip)")
    p.add_argument("--keep", action="store_true",
                   help="keep the model folder and its quantized copy (the model folder is reused if it is there)")
    p.add_argument("--compiled", action="store_true",
                   help="also decode the quantized folder with --compile on (compiling takes minutes at this size)")
    p.add_argument("--out", type=Path, default=RESULTS / "big_model.json")
    args = p.parse_args()

    config = v2_lite_config(args.layers)
    qfolder = args.folder.with_name(f"{args.folder.name}-{args.quantize}")
    from seekmoe.info import parameter_count

    print(header(f"big_model: DeepSeek-V2-Lite shapes, {args.layers} layers, "
                 f"{parameter_count(config) / 1e9:.2f}B parameters, bf16, decoding mapped from the files"))
    try:
        if not (args.keep and (args.folder / INDEX_NAME).is_file()):
            shutil.rmtree(args.folder, ignore_errors=True)
            start = time.perf_counter()
            size = write_model(args.folder, config)
            print(f"wrote {size / 2**30:.2f} GiB in {time.perf_counter() - start:.0f}s")
        size = sum(f.stat().st_size for f in args.folder.glob("*.safetensors"))
        quantized = None
        runs = {"bf16 mapped": decode(args.folder, args.tokens, args.threads, ["--dtype", "bfloat16"])}
        if args.quantize != "none":
            if has_quantize_flag():
                runs[f"{args.quantize} (from mapped bf16)"] = decode(args.folder, args.tokens, args.threads,
                                                                     ["--dtype", "bfloat16", "--quantize",
                                                                      args.quantize])
                # what a user does once: `seekmoe quantize` to a folder that fits, then decode it (no mapping)
                quantized = quantize_folder(args.folder, qfolder, args.quantize, args.threads)
                runs[f"{args.quantize} folder, eager"] = decode(qfolder, args.tokens, args.threads,
                                                               ["--dtype", "bfloat16"], mmap=False)
                if args.compiled:
                    runs[f"{args.quantize} folder, compiled"] = decode(
                        qfolder, args.tokens, args.threads, ["--dtype", "bfloat16", "--compile", "on"], mmap=False)
            else:
                print(f"(no --quantize in this seekmoe's generate: the {args.quantize} run is skipped)")
    finally:
        if not args.keep:
            shutil.rmtree(args.folder, ignore_errors=True)
            shutil.rmtree(qfolder, ignore_errors=True)
    rows = [["weights", "tokens/s", "peak RSS GiB", "private GiB", "file pages GiB", "process s", "compile s"]]
    for name, r in runs.items():
        rows.append([name, f"{r['tokens_per_s']:.2f}", f"{r['peak_rss_gib']:.2f}", f"{r['private_gib']:.2f}",
                     f"{r['file_pages_gib']:.2f}", f"{r['process_wall_s']:.0f}", f"{r['compile_s']:.0f}"])
    if quantized:
        print(f"seekmoe quantize --scheme {args.quantize}: {quantized['bytes'] / 2**30:.2f} GiB written in "
              f"{quantized['wall_s']:.0f}s, peak RSS {quantized['peak_rss_gib']:.2f} GiB (mapped source pages "
              f"included)")
    print(f"weights on disk: {size / 2**30:.2f} GiB; memory: {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.1f} GiB; "
          f"{args.tokens} tokens after a {PROMPT!r} prompt, {args.threads} threads, cold page cache")
    print(table(rows))
    write_json(args.out, {"layers": args.layers, "weights_bytes": size, "threads": args.threads, "runs": runs,
                          "quantize": quantized})


if __name__ == "__main__":
    main()
