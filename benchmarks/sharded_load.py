"""Per-rank peak memory of loading a model folder under torchrun (gloo, CPU): the meta-device build with sharded
reads (parallel/materialize.py, what `seekmoe train --init-from`, `sft --model` and `rl --model` do now) against
building and loading the whole model in every rank and sharding it afterwards (what they did before).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sharded_load.py            # ~300 MB model, 1, 2 and 4 processes
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sharded_load.py --quick    # ~40 MB, 1 and 2 processes

A rank's peak is its peak resident set (VmHWM, reset just before the load through /proc/self/clear_refs) minus its
resident set then, after a warm-up load of a tiny model has paid for torch's one-time set-up. It counts the pages
of the safetensors files the rank reads while they are mapped (one shard file at a time).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

MODES = {"sharded": "meta build, own slices", "whole": "whole model, then shard"}


def memory_kib() -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"(VmRSS|VmHWM):\s+(\d+)", open("/proc/self/status").read())}


def worker(mode: str, folder: str, out: str) -> None:
    """One torchrun rank: load `folder` the `mode` way, write {peak growth, own bytes, model bytes, seconds}."""
    import torch
    import torch.distributed as dist

    from seekmoe import ModelConfig, build_model, from_pretrained
    from seekmoe.parallel import ParallelConfig, init_processes, parallelize
    from seekmoe.parallel.materialize import check_folder, materialize

    config = ModelConfig.from_json_file(folder)
    parallel = ParallelConfig()
    processes = init_processes(parallel, config)
    tiny = ModelConfig.preset("tiny")
    # Warm-up: torch's one-time set-up of the calls the measured load makes.
    materialize(parallelize(build_model(tiny, device="meta"), processes, parallel), processes.device)
    processes.barrier()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = memory_kib()
    t0 = time.perf_counter()
    if mode == "sharded":
        model = build_model(config, device="meta")
        check_folder(model, folder)
        model = materialize(parallelize(model, processes, parallel), processes.device, folder)
    else:
        model = build_model(config)
        model.load_state_dict(from_pretrained(folder, dtype=torch.float32).state_dict())
        model = parallelize(model, processes, parallel)
    seconds = time.perf_counter() - t0
    after = memory_kib()
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size()
                for p in model.parameters())
    result = {"rank": processes.rank, "peak_growth_bytes": (after["VmHWM"] - before["VmRSS"]) * 1024,
              "own_bytes": local, "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
              "seconds": seconds}
    Path(f"{out}.{processes.rank}").write_text(json.dumps(result))
    if processes.distributed:
        dist.barrier()
        dist.destroy_process_group()


def model_config(target_mb: float):
    """A DeepSeek-V3-shaped config (MLA, 16 routed experts, a dense first layer, no MTP) of about `target_mb` MB of
    fp32 weights, grown by its number of layers."""
    from seekmoe import ModelConfig
    from seekmoe.info import parameter_count

    base = dict(vocab_size=8192, hidden_size=384, intermediate_size=1024, moe_intermediate_size=256,
                first_k_dense_replace=1, num_attention_heads=8, n_routed_experts=16, n_shared_experts=1,
                num_experts_per_tok=2, n_group=4, topk_group=2, q_lora_rank=128, kv_lora_rank=128,
                qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, num_nextn_predict_layers=0)
    layers = 2
    while parameter_count(ModelConfig.preset("tiny", **base, num_hidden_layers=layers + 1)) * 4 <= target_mb * 1e6:
        layers += 1
    return ModelConfig.preset("tiny", **base, num_hidden_layers=layers)


def main() -> None:
    from common import RESULTS, header, machine

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mb", type=float, default=300, help="fp32 size of the model folder (default 300)")
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4], help="process counts (default 1 2 4)")
    p.add_argument("--quick", action="store_true", help="~40 MB, 1 and 2 processes")
    p.add_argument("--out", type=Path, default=RESULTS / "sharded_load.json")
    args = p.parse_args()
    if args.quick:
        args.size_mb, args.procs = 40, [1, 2]

    import torch

    from seekmoe import build_model

    print(header(f"sharded loading: per-rank peak memory, gloo on CPU, OMP_NUM_THREADS="
                 f"{os.environ.get('OMP_NUM_THREADS', 'unset')}"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        config = model_config(args.size_mb)
        torch.manual_seed(0)
        build_model(config).save_pretrained(folder, max_shard_bytes=int(args.size_mb * 1e6 / 8))
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        print(f"model: {config.num_hidden_layers} layers, {size / 2**20:.0f} MiB of fp32 safetensors in "
              f"{len(list(folder.glob('*.safetensors')))} files\n")
        print(f"| processes | load | peak growth a rank (max) | / model | own shards a rank | seconds |")
        print("| --- | --- | --- | --- | --- | --- |")
        for n in args.procs:
            for mode in MODES:
                out = Path(tmp) / f"{mode}-{n}"
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
                       __file__, "--worker", mode, str(folder), str(out)]
                env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
                subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
                ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(n)]
                peak = max(r["peak_growth_bytes"] for r in ranks)
                row = {"processes": n, "mode": mode, "peak_growth_bytes": peak, "model_bytes": size,
                       "own_bytes": max(r["own_bytes"] for r in ranks),
                       "seconds": max(r["seconds"] for r in ranks)}
                rows.append(row)
                print(f"| {n} | {MODES[mode]} | {peak / 2**20:.0f} MiB | {peak / size:.2f}x | "
                      f"{row['own_bytes'] / 2**20:.0f} MiB | {row['seconds']:.1f} |", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine(), "model_bytes": size, "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:5])
    else:
        main()
