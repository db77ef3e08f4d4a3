"""Training throughput at 1, 2 and 4 processes on CPU (gloo): tokens/s, all-to-all bytes per step and the share of
step time spent in communication, with FSDP2 and expert parallelism (ep = the number of processes).

    python benchmarks/scaling.py                 # small preset, 1/2/4 processes, a few minutes
    python benchmarks/scaling.py --quick         # smoke run
    torchrun --nproc-per-node N benchmarks/scaling.py --worker ...   (what the driver starts)

On a 2-core machine 4 processes share 2 cores: tokens/s then measures overhead, not scaling. Communication time
is the CPU time of gloo collectives seen by torch.profiler (all-to-all, all-gather, reduce-scatter, all-reduce).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, header, table, write_json  # noqa: E402


def worker(args) -> None:
    """One process of a measured run: a few optimizer steps of the preset on random tokens."""
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    import seekmoe
    from seekmoe import ModelConfig
    from seekmoe.model.moe import BalanceWindow
    from seekmoe.parallel import ParallelConfig, init_processes, parallelize
    from seekmoe.train.config import TrainConfig
    from seekmoe.train.optim import build_optimizer
    from seekmoe.train.step import TrainStep

    config = ModelConfig.preset(args.preset)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    parallel = ParallelConfig(ep=world if world > 1 else 1)
    procs = init_processes(parallel, config)
    torch.manual_seed(0)
    model = parallelize(seekmoe.build_model(config).train(), procs, parallel)
    optimizer = build_optimizer(model, TrainConfig())
    step = TrainStep(model, optimizer, 1.0, None, procs.device,
                     procs.all_reduce_sum if procs.distributed else None)
    batch = [torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len))]
    for _ in range(2):  # warm-up
        step(batch, 1e-4, 0.3, 0.001)
    dispatchers = [m.dispatcher for m in model.moe_layers() if hasattr(m.dispatcher, "bytes_sent")]
    for d in dispatchers:
        d.bytes_sent = 0
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            step(batch, 1e-4, 0.3, 0.001)
        elapsed = time.perf_counter() - start
    comm_us = sum(e.self_cpu_time_total for e in prof.key_averages()
                  if any(k in e.key.lower() for k in ("gloo", "nccl", "c10d::", "all_to_all", "allreduce",
                                                      "all_reduce", "allgather", "all_gather", "reduce_scatter")))
    result = {"processes": world, "step_s": elapsed / args.steps,
              "tokens_per_s": world * args.batch_size * args.seq_len * args.steps / elapsed,
              "all_to_all_bytes_per_step": sum(d.bytes_sent for d in dispatchers) / args.steps,
              "comm_share": comm_us / 1e6 / elapsed}
    if procs.distributed:
        gathered = [None] * world
        dist.all_gather_object(gathered, result)
        if procs.rank == 0:
            result = {**result, "all_to_all_bytes_per_step": sum(g["all_to_all_bytes_per_step"] for g in gathered),
                      "comm_share": sum(g["comm_share"] for g in gathered) / world}
        dist.destroy_process_group()
    if procs.rank == 0:
        Path(args.result).write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per process per step")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="tiny preset, 3 steps")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.preset, args.steps, args.batch_size, args.seq_len = "tiny", 3, 2, 32
    if args.worker:
        worker(args)
        return
    print(header(f"training throughput by number of processes ({args.preset} preset, fp32, gloo, ep = processes)"))
    rows = [["processes", "tokens/s", "step (s)", "all-to-all MB/step", "communication share"]]
    results = []
    for n in args.processes:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "result.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", __file__,
                   "--worker", "--result", str(out), "--preset", args.preset, "--batch-size", str(args.batch_size),
                   "--seq-len", str(args.seq_len), "--steps", str(args.steps)]
            subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            r = json.loads(out.read_text())
        results.append(r)
        rows.append([str(n), f"{r['tokens_per_s']:,.0f}", f"{r['step_s']:.3f}",
                     f"{r['all_to_all_bytes_per_step'] / 1e6:.2f}", f"{r['comm_share']:.0%}"])
        print(table(rows), flush=True) if n == args.processes[-1] else None
    write_json(RESULTS / "scaling.json", {"preset": args.preset, "batch_size_per_process": args.batch_size,
                                          "seq_len": args.seq_len, "results": results})


if __name__ == "__main__":
    main()
