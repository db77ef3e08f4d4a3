"""Why many experts cost more on a CPU than their arithmetic: the experts' weight gradients are fresh tensors every
step, and large ones are page-faulted in every time.

glibc serves an allocation of 32 MB or more with mmap and returns it to the system when freed, so a [E, 2I, H]
weight gradient (64 MB at E=256, H=256, I=128 in fp32) is mapped, faulted in page by page, and unmapped again in
every training step. This prints the time of the expert GEMMs at E=32 and E=256 (the same 8192 rows either way, so
the same arithmetic), and of one MoE layer forward + backward (moe_layer.py's sweep shape) at E=8 and E=256. Run it
twice to see the allocator's share:

    python benchmarks/expert_grads.py
    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184 python benchmarks/expert_grads.py   # freed memory kept

The second run keeps freed memory in the process (glibc's heap, never trimmed), so each step reuses pages.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import header, median_times, table  # noqa: E402
from moe_layer import Shape, build_layers, train_step  # noqa: E402

ROWS, HIDDEN, WIDTH = 8192, 256, 128


def gemm_steps(n_experts: int) -> dict:
    """The gate/up projection's three GEMMs over ROWS rows split evenly among n_experts, and one plain GEMM."""
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(ROWS, HIDDEN, generator=g)
    grads = torch.randn(ROWS, 2 * WIDTH, generator=g)
    weights = torch.randn(n_experts, 2 * WIDTH, HIDDEN, generator=g)
    offsets = torch.arange(1, n_experts + 1, dtype=torch.int32) * (ROWS // n_experts)
    dense = torch.randn(HIDDEN, 2 * WIDTH, generator=g)
    return {
        f"one mm {ROWS}x{HIDDEN}x{2 * WIDTH}": lambda: rows @ dense,
        f"E={n_experts} forward": lambda: torch._grouped_mm(rows, weights.transpose(1, 2), offs=offsets),
        f"E={n_experts} input grad": lambda: torch._grouped_mm(grads, weights, offs=offsets),
        f"E={n_experts} weight grad": lambda: torch._grouped_mm(grads.t(), rows, offs=offsets),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed runs of each (median reported)")
    args = parser.parse_args(argv)
    allocator = ", ".join(f"{k}={os.environ[k]}" for k in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")
                          if k in os.environ) or "glibc defaults"
    print(header(f"expert weight gradients and the allocator ({allocator}), fp32"))
    rows = [["what", "ms"]]
    for n in (32, 256):
        for name, t in median_times(gemm_steps(n), args.repeats).items():
            if n == 256 or not name.startswith("one mm"):
                rows.append([name, f"{1e3 * t:.1f}"])
    for n in (8, 256):
        torch.manual_seed(0)
        ours, _, dense = build_layers(Shape(f"E={n}", n, 4, HIDDEN, WIDTH, 1, 2048))
        g = torch.Generator().manual_seed(1)
        x = torch.randn(1, 2048, HIDDEN, generator=g).requires_grad_()
        dy = torch.randn(1, 2048, HIDDEN, generator=g)
        t = median_times({"moe": train_step(ours, x, dy, None)}, max(3, args.repeats // 3))["moe"]
        rows.append([f"MoE layer E={n} top-4, 2048 tokens, forward + backward", f"{1e3 * t:.1f}"])
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
