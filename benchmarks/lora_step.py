"""A LoRA training step on a 64-expert model: the routed experts' adapters merged into a copy of every expert's
weights at each step (`materialize`, the first implementation) against the adapters run on the rank-wide path
through the grouped GEMMs (the default): step time and the peak bytes of the tensors one step creates.

    OMP_NUM_THREADS=1 python benchmarks/lora_step.py            # 3 layers, 64 experts top-6, batch 4 x 128
    OMP_NUM_THREADS=1 python benchmarks/lora_step.py --quick    # smoke run

Peak bytes are counted per created tensor (a dispatch mode that adds each new storage's bytes and subtracts them
when it is freed): the activations, gradients and optimizer state a step allocates, not the frozen weights
allocated before it, and no allocator or page-level effects.
"""

from __future__ import annotations

import argparse
import sys
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, header, median_times, table, write_json  # noqa: E402

import seekmoe  # noqa: E402
from seekmoe.lora import LoRAConfig, apply_lora  # noqa: E402


class PeakTensorBytes(TorchDispatchMode):
    """The peak of the live bytes of the tensors created while it is on (each storage counted once)."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.storages = 0, 0, set()

    def _free(self, key: int, nbytes: int) -> None:
        self.storages.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if id(storage) not in self.storages:
                    self.storages.add(id(storage))
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._free, id(storage), storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out


def adapted_model(config: seekmoe.ModelConfig, rank: int, materialize: bool):
    """The model of `config` (seed 0) with rank-`rank` adapters on the default targets, the experts' merged or not."""
    torch.manual_seed(0)
    model = seekmoe.build_model(config).train()
    adapted = apply_lora(model, LoRAConfig(rank=rank))
    for provider in adapted.experts.values():
        provider.materialize = materialize
    return model


def training_step(model, ids: torch.Tensor):
    """One AdamW step of the adapters on the next-token loss of `ids`."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()
        optimizer.step()

    return step


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller model and batch, 2 timed steps")
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args(argv)
    fields = dict(n_routed_experts=64, num_experts_per_tok=6, n_group=1, topk_group=1, hidden_size=256,
                  moe_intermediate_size=128, num_hidden_layers=3, num_nextn_predict_layers=0)
    batch, seq, repeats = (2, 32, 2) if args.quick else (4, 128, 5)
    config = seekmoe.ModelConfig.preset("small", **fields)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))
    print(header(f"LoRA rank {args.rank} training step, 64 experts top-6 (hidden 256, expert width 128, "
                 f"{config.n_moe_layers} MoE layers), batch {batch} x {seq}, fp32"))
    variants = {"merged W + BA (old)": True, "rank-wide path (new)": False}
    models = {name: adapted_model(config, args.rank, m) for name, m in variants.items()}
    steps = {name: training_step(model, ids) for name, model in models.items()}
    times = median_times(steps, repeats, warmup=1)
    peaks = {}
    for name, step in steps.items():
        with PeakTensorBytes() as counter:
            step()
        peaks[name] = counter.peak
    expert_bytes = sum(m.experts.gate_up_proj.numel() + m.experts.down_proj.numel()
                       for m in models["rank-wide path (new)"].moe_layers()) * 4
    rows = [["experts' adapters", "step ms (median)", "peak MiB created in a step"]]
    rows += [[name, f"{times[name] * 1e3:.0f}", f"{peaks[name] / 2**20:.1f}"] for name in variants]
    print(table(rows))
    print(f"(the routed experts' weights: {expert_bytes / 2**20:.1f} MiB)")
    write_json(RESULTS / ("lora_step_quick.json" if args.quick else "lora_step.json"),
               {"fields": fields, "batch": batch, "seq": seq, "rank": args.rank, "expert_weight_bytes": expert_bytes,
                "step_s": times, "peak_created_bytes": peaks})


if __name__ == "__main__":
    main()
