"""Worker for tests/test_sharded_loading.py, started by torchrun on gloo:

    python -m torch.distributed.run --nproc-per-node N tests/sharded_worker.py FOLDER EP OUT_JSON

Builds FOLDER's model on the meta device, parallelizes it (FSDP2, expert parallelism when EP > 1) and reads each
rank's shards, measuring the rank's peak resident memory while it does; then initializes the shards of a fresh tiny
model. Rank 0 gathers each model and checks it bit for bit against the one-process `from_pretrained` (or
`build_model` after the same seed); every rank writes what it measured to OUT_JSON.RANK.
"""

import json
import os
import re
import sys

import torch
import torch.distributed as dist

from seekmoe import ModelConfig, build_model, from_pretrained
from seekmoe.parallel import ParallelConfig, init_processes, parallelize
from seekmoe.parallel.materialize import check_folder, materialize

SEED = 1234


def memory_kib() -> dict[str, int]:
    """This process's VmRSS and VmHWM (peak resident set), in KiB."""
    return {k: int(v) for k, v in re.findall(r"(VmRSS|VmHWM):\s+(\d+)", open("/proc/self/status").read())}


def assert_gathers_to(model, want: dict[str, torch.Tensor], rank: int) -> None:
    """Every rank gathers `model`; rank 0 compares it with the one-process state `want`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        assert set(state) == set(want), set(state) ^ set(want)
        for key, tensor in want.items():
            assert torch.equal(state[key], tensor), f"{key} differs from the one-process model"


def main(folder: str, ep: int, out: str) -> None:
    config = ModelConfig.from_json_file(folder)
    parallel = ParallelConfig(ep=ep)
    processes = init_processes(parallel, config)
    tiny = ModelConfig.preset("tiny")
    # Warm-up: the first parallelize/materialize imports and sets up torch machinery (tens of MB once per process);
    # a tiny model takes that cost before the measurement starts.
    materialize(parallelize(build_model(tiny, device="meta"), processes, parallel), processes.device)
    dist.barrier()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set to the current one
    before = memory_kib()
    model = build_model(config, device="meta")
    check_folder(model, folder)
    materialize(parallelize(model, processes, parallel), processes.device, folder)
    after = memory_kib()
    result = {"rank": processes.rank, "peak_growth_bytes": (after["VmHWM"] - before["VmRSS"]) * 1024,
              "local_param_bytes": sum(p.to_local().numel() * p.element_size() for p in model.parameters()),
              "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
    with open(f"{out}.{processes.rank}", "w") as f:
        json.dump(result, f)
    want = from_pretrained(folder, dtype=torch.float32).state_dict() if processes.rank == 0 else {}
    assert_gathers_to(model, want, processes.rank)

    # A fresh run: each rank initializes its shards to the values one process gives the whole model.
    torch.manual_seed(SEED)
    fresh = materialize(parallelize(build_model(tiny, device="meta"), processes, parallel), processes.device)
    torch.manual_seed(SEED)
    assert_gathers_to(fresh, build_model(tiny).state_dict() if processes.rank == 0 else {}, processes.rank)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip the interpreter's teardown, which sometimes aborts on torch's C++ threads (distributed_worker.py)
