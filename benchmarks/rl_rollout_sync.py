"""What gathering a full copy of the policy costs GRPO under torchrun (posttrain/rollout_sync.py): the time of one
refresh of the inference copy from the FSDP2 (and expert-parallel) shards against the time of the rollout it
serves, and the copy's memory.

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/rl_rollout_sync.py \
        --preset small [--ep 2] [--completions 16] [--new-tokens 16] [field=value ...]

Prints one table row on rank 0 (no asserts; timings on a shared CPU are rough).
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--completions", type=int, default=16, help="completions a rank samples")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("fields", nargs="*", metavar="field=value", help="ModelConfig fields over the preset's")
    args = parser.parse_args()

    from seekmoe import ModelConfig, build_model
    from seekmoe.inference.engine import Engine
    from seekmoe.inference.sampling import SamplingParams
    from seekmoe.parallel import ParallelConfig, init_processes, parallelize
    from seekmoe.posttrain.rollout_sync import InferencePolicy

    import json

    fields = {k: json.loads(v) for k, v in (f.split("=", 1) for f in args.fields)}
    config = ModelConfig.preset(args.preset, **fields)
    parallel = ParallelConfig(ep=args.ep)
    procs = init_processes(parallel, config)
    torch.manual_seed(0)
    model = parallelize(build_model(config).to(procs.device).train(), procs, parallel)
    policy = InferencePolicy(model, procs.device, distributed=procs.distributed)
    refresh = []
    for _ in range(args.repeats):
        procs.barrier()
        t0 = time.perf_counter()
        policy.refresh()
        refresh.append(time.perf_counter() - t0)
    engine = Engine(policy.model, max_batch_size=args.completions, max_seq_len=64)
    prompts = [[1 + (i * 7 + j) % (config.vocab_size - 2) for j in range(12)] for i in range(args.completions)]
    params = [SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, seed=i) for i in range(len(prompts))]
    t0 = time.perf_counter()
    engine.generate(prompts, params)
    rollout = time.perf_counter() - t0
    n_params = sum(p.numel() for p in policy.model.parameters())
    if procs.rank == 0:
        print("| preset | processes | ep | params | copy (MB, fp32) | refresh (s, min of "
              f"{args.repeats}) | rollout of {args.completions} x {args.new_tokens} tokens (s) |")
        print(f"| {args.preset} | {procs.world_size} | {args.ep} | {n_params / 1e6:.2f}M | "
              f"{n_params * 4 / 2**20:.1f} | {min(refresh):.3f} | {rollout:.2f} |", flush=True)
    if procs.distributed:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
