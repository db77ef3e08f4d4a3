"""Peak memory (and time) of tokenizing a generated corpus: tokenizer training and tokenizing, each in a process of
its own so that each peak is its own (`ru_maxrss`; "growth" is it minus the resident size once imports are done,
the memory the phase itself takes at its peak). Linux only (/proc).

Two corpus shapes of `--size` bytes of random words: `lines` (files of 64 MB, a line break every ~12 words, like
prose or code) and `one-line` (one file with no line break at all, the case that exhausted memory before issue 26).
The tokenizer is trained on the first `--train-mb` MB (BPE training time grows with the corpus, its memory with
the distinct words; `--train-mb 0` trains on everything) and then tokenizes the whole corpus.

    OMP_NUM_THREADS=1 python benchmarks/tokenize_memory.py                 # 1 GB of each shape
    OMP_NUM_THREADS=1 python benchmarks/tokenize_memory.py --size 200MB --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, header, table, write_json  # noqa: E402

_CHILD = r"""
import json, os, resource, sys, time
from pathlib import Path
phase, corpus_dir, tok_path, work, train_mb, threads = sys.argv[1:7]
if int(threads):
    os.sched_setaffinity(0, range(int(threads)))
import seekmoe.data.tokenizing as tokenizing
from seekmoe.data import discover_corpus, train_tokenizer
from tokenizers import Tokenizer
corpus = discover_corpus([corpus_dir])
# what the process holds now, once imports are done (its high-water mark may be above it: import-time garbage)
base = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:"))
start = time.perf_counter()
if phase == "train":
    limit = int(float(train_mb) * 1e6)
    def sample():
        seen = 0
        for piece in tokenizing.nonempty_pieces(corpus):
            yield piece
            seen += len(piece)
            if limit and seen >= limit:
                return
    train_tokenizer(sample(), 4096).save(tok_path)
else:
    meta = tokenizing.tokenize_corpus(work, corpus, Tokenizer.from_file(tok_path), 0.0, progress=False)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "peak_mib": peak / 1024, "growth_mib": (peak - base) / 1024,
                  "threads": tokenizing.encode_threads()}))
"""


def parse_size(text: str) -> int:
    """'1GB', '200MB', '5e6' -> bytes (decimal units)."""
    units = {"KB": 1e3, "MB": 1e6, "GB": 1e9}
    for unit, scale in units.items():
        if text.upper().endswith(unit):
            return int(float(text[:-2]) * scale)
    return int(float(text))


def generate(folder: Path, size: int, shape: str, seed: int = 0) -> None:
    """`size` bytes of random lowercase words (a Zipf-like choice among 50,000), in 64 MB files (`lines`) or one
    file without a line break (`one-line`)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    letters = np.frombuffer(b"etaoinshrdlcumwfgypbvkjxqz", dtype=np.uint8)
    words = ["".join(map(chr, rng.choice(letters, rng.integers(1, 11)))) for _ in range(50_000)]
    weights = 1.0 / np.arange(1, len(words) + 1)
    weights /= weights.sum()
    folder.mkdir(parents=True)
    written, index = 0, 0
    file_size = size if shape == "one-line" else 64_000_000
    while written < size:
        with (folder / f"part-{index:04d}.txt").open("w") as f:
            in_file = 0
            while in_file < file_size and written < size:
                picks = rng.choice(len(words), 200_000, p=weights)
                sep = " " if shape == "one-line" else None
                if sep:
                    block = " ".join(words[i] for i in picks) + " "
                else:
                    block = "\n".join(" ".join(words[i] for i in picks[s:s + 12]) for s in range(0, len(picks), 12))
                    block += "\n"
                block = block[:min(size - written, file_size - in_file)]
                f.write(block)
                in_file += len(block)
                written += len(block)
        index += 1


def run(phase: str, corpus: Path, tok: Path, work: Path, train_mb: float, threads: int) -> dict:
    env = {**os.environ}
    if threads:
        env["RAYON_NUM_THREADS"] = str(threads)
    out = subprocess.run([sys.executable, "-c", _CHILD, phase, str(corpus), str(tok), str(work), str(train_mb),
                          str(threads)], env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{phase} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1GB", help="corpus size, e.g. 1GB, 200MB (default 1GB)")
    parser.add_argument("--shapes", default="lines,one-line", help="comma-separated: lines, one-line")
    parser.add_argument("--train-mb", type=float, default=20.0, help="MB the tokenizer trains on (0: all)")
    parser.add_argument("--threads", type=int, default=0, help="cores to use (default: every core)")
    parser.add_argument("--tmp", default=None, help="folder for the generated corpus (default: the system's)")
    parser.add_argument("--out", type=Path, default=RESULTS / "tokenize_memory.json")
    args = parser.parse_args()
    size = parse_size(args.size)
    print(header(f"tokenizing memory: {size / 1e6:,.0f} MB corpora, {args.threads or 'all'} cores"))
    rows = [["shape", "MB", "phase", "threads", "seconds", "MB/s", "peak MiB", "growth MiB", "growth / corpus bytes"]]
    results = []
    for shape in args.shapes.split(","):
        with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
            tmp = Path(tmp)
            generate(tmp / "corpus", size, shape)
            for phase in ("train", "tokenize"):
                r = run(phase, tmp / "corpus", tmp / "tokenizer.json", tmp / "work", args.train_mb, args.threads)
                mb = size / 1e6 if phase == "tokenize" or not args.train_mb else min(args.train_mb, size / 1e6)
                results.append({"shape": shape, "bytes": size, "phase": phase, **r})
                rows.append([shape, f"{mb:,.0f}", phase, str(r["threads"]), f"{r['seconds']:.1f}",
                             f"{mb / r['seconds']:.2f}", f"{r['peak_mib']:,.0f}", f"{r['growth_mib']:,.0f}",
                             f"{r['growth_mib'] * 2**20 / (mb * 1e6):.3f}"])
                print(f"{shape} {phase}: {r['seconds']:.1f} s, peak growth {r['growth_mib']:,.0f} MiB", flush=True)
    print()
    print(table(rows))
    write_json(args.out, {"size": size, "train_mb": args.train_mb, "results": results})


if __name__ == "__main__":
    main()
