"""What the benchmark scripts share: the machine header, interleaved median timing, tables and JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or the platform's guess elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_flags() -> dict[str, bool]:
    """Which of the instruction sets that decide fp32 and bf16 speed on a CPU this one has (all False where
    /proc/cpuinfo is missing)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {flag: False for flag in CPU_FLAGS}
    present = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            present.update(line.split(":", 1)[1].split())
            break
    return {flag: flag in present for flag in CPU_FLAGS}


def mkldnn_bf16_native() -> bool:
    """Whether torch's oneDNN computes bf16 natively here (AVX-512 bf16 or AMX) rather than emulating it; what
    `precision=auto` decides by on a CPU."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def machine() -> dict:
    """The facts a timing table needs to be read against."""
    import transformers

    return {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "mkldnn_bf16_native": mkldnn_bf16_native(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            # Other jobs on a shared machine, and how idle OpenMP threads wait, move these timings a lot.
            "load_average_1min": os.getloadavg()[0], "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset")}


def header(title: str) -> str:
    """The title, then the machine: CPU, its bf16-relevant flags, threads, versions, date and load."""
    m = machine()
    flags = " ".join(f"{name}={'yes' if on else 'no'}" for name, on in m["cpu_flags"].items())
    return (f"{title}\n{m['cpu']}, {m['torch_threads']} torch threads, torch {m['torch']}, "
            f"transformers {m['transformers']}, {m['date']}\n"
            f"CPU flags: {flags}; torch mkldnn bf16 native: {'yes' if m['mkldnn_bf16_native'] else 'no'}\n"
            f"load average {m['load_average_1min']:.1f} at start, OMP_WAIT_POLICY={m['omp_wait_policy']}")


def median_times(steps: dict[str, Callable[[], None]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each step. Steps run interleaved (one of each per round), so that load from other
    processes on a shared machine falls on all of them alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def table(rows: list[list[str]]) -> str:
    """Left-aligned columns; the first row is the heading."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2) + "\n")
    print(f"\nwrote {path}")


def packed_sequences(files: list[Path], tokenizer, seq_len: int, max_seqs: int) -> torch.Tensor:
    """The files packed as training packs them (<|begin_of_text|> text <|end_of_text|>, concatenated), cut into
    [n, seq_len] sequences, at most `max_seqs` of them."""
    bos, eos = tokenizer.token_to_id("<|begin_of_text|>"), tokenizer.token_to_id("<|end_of_text|>")
    ids: list[int] = []
    for f in files:
        ids += [bos] + tokenizer.encode(f.read_text(encoding="utf-8", errors="replace")).ids + [eos]
    n = min(len(ids) // seq_len, max_seqs)
    return torch.tensor(ids[:n * seq_len]).view(n, seq_len)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None (with a note) where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return None
    return plt


def save_figure(fig, path: Path) -> Path:
    """Write `fig` as a PNG to `path` (creating its folder) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
