"""Run by tests/test_muon.py under torchrun (gloo, CPU): Muon under FSDP2 (and expert parallelism) equals one process.

    python -m torch.distributed.run --nproc-per-node 2 tests/muon_worker.py EP ATTENTION   (ATTENTION: mla | mha)

Every rank builds the same tiny model twice: one kept whole (the reference, trained on the whole global batch) and
one parallelized (each rank training on its slice, then handed the reference's gradients). After three steps of
`optimizer=muon` every weight, gathered, equals the reference's: 2-D weights gathered per matrix, expert stacks
orthogonalized on their local experts. Exits non-zero with the failing check on stderr.
"""

import sys

import torch

torch.set_num_threads(1)

import seekmoe  # noqa: E402
from seekmoe import ModelConfig  # noqa: E402
from seekmoe.model.moe import BalanceWindow  # noqa: E402
from seekmoe.parallel import ParallelConfig, init_processes, parallelize  # noqa: E402
from seekmoe.train.config import TrainConfig  # noqa: E402
from seekmoe.train.optim import build_optimizer  # noqa: E402


def main(ep: int, attention: str) -> None:
    from torch.distributed.tensor import DTensor, distribute_tensor

    config = ModelConfig.preset("tiny", num_nextn_predict_layers=0, use_mla=attention == "mla",
                                rope_interleave=attention == "mla")
    parallel = ParallelConfig(ep=ep)
    procs = init_processes(parallel, config)
    W, r = procs.world_size, procs.rank
    train = TrainConfig(optimizer="muon", lr=1e-2, weight_decay=0.1)
    torch.manual_seed(0)
    reference = seekmoe.build_model(config).train()
    model = seekmoe.build_model(config).train()
    model.load_state_dict(reference.state_dict())
    parallelize(model, procs, parallel)
    ref_opt, opt = build_optimizer(reference, train), build_optimizer(model, train)
    for step in range(3):
        torch.manual_seed(10 + step)
        ids = torch.randint(0, config.vocab_size, (2 * W, 16))
        reference(ids, labels=ids).loss.backward()
        mine = ids[2 * r:2 * (r + 1)]
        model(mine, labels=mine, balance_window=BalanceWindow(procs.all_reduce_sum)).loss.backward()
        # The sharded gradients equal the reference's up to summation order, which Adam's normalization of tiny
        # gradients amplifies: give both optimizers the reference's gradients, so that what is compared is the
        # optimizers' arithmetic on sharded and whole weights.
        for p, q in zip(model.parameters(), reference.parameters()):
            p.grad = distribute_tensor(q.grad, p.device_mesh, p.placements, src_data_rank=None) \
                if isinstance(p, DTensor) else q.grad.clone()
        ref_opt.step()
        opt.step()
        ref_opt.zero_grad()
        opt.zero_grad()
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        full = p.full_tensor() if isinstance(p, DTensor) else p
        err = ((full - q).abs().max() / q.abs().max()).item()
        assert err < 1e-6, f"{name}: relative difference {err:.2e} after 3 steps of {train.optimizer} (ep={ep})"
    if r == 0:
        print(f"muon under FSDP (ep={ep}, {attention}, {W} processes) equals one process")


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
