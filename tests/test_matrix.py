"""Every stage under every layout (issue 22, item 6): pretraining (`seekmoe train`) with DeepSeek's, Switch's and
GShard's routers, context extension (`--extend-context`), SFT (`seekmoe sft`) and grow-training (`--train
new-experts,router`), under one process, FSDP dp=2, EP=2 and dp2 x ep2, compiled and not, reproduce the
single-process eager losses to 1e-4 wherever the math is the same.

Cost: each multi-process check is ONE torchrun launch that runs all its command lines in one process group
(tests/distributed_worker.py `matrix`), 3 steps of the tiny preset at a global batch of 4 x 32 tokens. The default run
keeps a representative subset (every router, every stage, compile on, the local-capacity case); the full cross product is
marked slow (`pytest -m slow tests/test_matrix.py`).

Where the math differs between layouts, and what is checked instead:
- Capacity (Switch/GShard's token dropping, default 1.25) is counted over the batch a rank routes, so a rank of
  dp=2 drops other tokens than one process routing the whole batch. Their balance loss E * sum_i f_i P_i is likewise
  computed over each forward's own tokens (balance_scope=global windows only the DeepSeek router's losses), and a
  mean over ranks of products is not the product over the whole batch. The exactness runs set capacity_factor=0
  (dropless) and router_aux_loss_coef=0; with both on (Switch's defaults, the "local" stage), micro-batches of one
  sequence make every layout route the same micro-batches: 4 on one process by grad_accum=4, 2 on each of 2 ranks,
  1 on each of 4.
- SFT's loss is a mean over each micro-batch's assistant tokens, micro-batches averaged with equal weight (not a
  mean over every labelled token of the step), so 4 sequences in one micro-batch differ from 2 + 2 on two ranks when
  the halves hold different numbers of labelled tokens; with micro-batches of one sequence every layout agrees.
- GShard keeps its second expert with probability min(1, g2 / second_expert_threshold), drawn by torch.rand per
  routed token: every rank draws from the same seeded generator for its own tokens, so rank 1's draws are not the
  ones one process draws for the second half of the batch. A tiny threshold keeps every second expert (no draw
  decides anything), so the routing is GShard's deterministic top-2.
- Switch's router jitter (off by default) draws noise per token in the same way, so it stays off.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import pytest

from seekmoe.cli import main
from test_distributed import WORKER, assert_same_losses, losses, torchrun

STEPS = 3
BASE_POSITIONS = 32  # the base model's context; --extend-context doubles it
# Global batch 4 x 32 tokens at any number of processes (batch_size is per rank); no evaluation or checkpoint
# before the end; fp32 so that the sums agree to rounding.
TRAIN = dict(seq_len=32, max_steps=STEPS, warmup_steps=1, eval_every=100, save_every=100, eval_batches=1,
             keep_checkpoints=1, precision="fp32", lr=3e-3, num_threads=1, bias_update_speed=0.01,
             aux_loss_alpha=0.001)
# Switch and GShard without capacity and without their balance loss, GShard keeping every second expert (threshold
# 1e-9): the settings under which their math is the same at any layout, see the module docstring.
LOCAL_OFF = {"capacity_factor": 0, "eval_capacity_factor": 0, "router_aux_loss_coef": 0}
ROUTERS = {
    "deepseek": {},
    "switch": {"router_type": "switch", "num_experts_per_tok": 1, **LOCAL_OFF},
    "gshard": {"router_type": "gshard", **LOCAL_OFF, "second_expert_threshold": 1e-9},
}
LAYOUTS = {"one": (1, 1), "dp2": (2, 1), "ep2": (2, 2), "dp2xep2": (4, 2)}  # name: (processes, ep)


def one_sequence_micro_batches(nproc: int) -> dict:
    """The global batch of 4 as micro-batches of one sequence, 4 / nproc on each rank: the same micro-batches, each
    weighing 1/4, at any layout (for the objectives computed per micro-batch)."""
    return {"batch_size": 1, "grad_accum": 4 // nproc}


def overrides(fields: dict) -> list[str]:
    """`field=value` arguments (values as YAML reads them)."""
    return [f"{k}={json.dumps(v)}" for k, v in fields.items()]


class Stages:
    """The command line of every stage for a layout, and the single-process reference losses (computed once)."""

    def __init__(self, root: Path, corpus: Path, cache: str):
        self.root, self.corpus, self.cache = root, corpus, cache
        self.references: dict[str, list[float]] = {}
        self.launches = 0
        common = {**TRAIN, "cache_dir": cache, "batch_size": 4, "max_position_embeddings": BASE_POSITIONS}
        assert main(["train", "--preset", "tiny", "--data", str(corpus), "--out", str(root / "base"),
                     "--no-progress", *overrides({**common, "max_steps": 2})]) == 0
        self.base = root / "base" / "final"
        assert main(["expand", "--model", str(self.base), "--add-experts", "4", "--init", "zero",
                     "--out", str(root / "grown")]) == 0
        from test_sft import CAPITALS, PHRASINGS, TRAIN as PAIRS

        self.chats = root / "chats.jsonl"
        self.chats.write_text("".join(json.dumps({"prompt": PHRASINGS[i].format(c), "completion": CAPITALS[c]}) + "\n"
                                      for c, i in PAIRS * 4))

    def argv(self, stage: str, layout: str, out: Path, compile: bool = False) -> list[str]:
        """`seekmoe ...` of `stage` ("pretrain-ROUTER", "local", "extend", "sft", "grow") under `layout`."""
        nproc, ep = LAYOUTS[layout]
        fields = {**TRAIN, "cache_dir": self.cache, "batch_size": 4 // nproc, "compile": compile}
        if ep > 1:
            fields["parallel.ep"] = ep
        data = ["--data", str(self.corpus)]
        if stage.startswith("pretrain-"):
            fields.update(ROUTERS[stage.removeprefix("pretrain-")], max_position_embeddings=BASE_POSITIONS)
            head = ["train", "--preset", "tiny"]
        elif stage == "local":
            # Switch with its default capacity (1.25) and balance loss, both local to the batch a forward routes:
            # one process routes the same micro-batches as the ranks do, by grad_accum.
            fields.update(router_type="switch", num_experts_per_tok=1, max_position_embeddings=BASE_POSITIONS,
                          **one_sequence_micro_batches(nproc))
            head = ["train", "--preset", "tiny"]
        elif stage == "extend":
            fields.update(seq_len=2 * BASE_POSITIONS, min_file_bytes=0, lr=3e-3)
            head = ["train", "--init-from", str(self.base), "--extend-context", str(2 * BASE_POSITIONS)]
        elif stage == "grow":
            fields.update(new_expert_bias_update_speed=0.5, new_expert_onboarding_steps=STEPS)
            head = ["train", "--init-from", str(self.root / "grown"), "--train", "new-experts,router"]
        elif stage == "sft":
            # Each micro-batch's loss is the mean over its own assistant tokens, and micro-batches (and ranks) weigh
            # equally, so the split matters when they hold different numbers of labelled tokens: two ranks equal
            # one process that takes the same micro-batches by grad_accum (see the module docstring).
            fields.update(one_sequence_micro_batches(nproc))
            head, data = ["sft", "--model", str(self.base)], ["--data", str(self.chats)]
        else:
            raise ValueError(stage)
        return [*head, *data, "--out", str(out), "--no-progress", *overrides(fields)]

    def reference(self, stage: str) -> list[float]:
        """The losses of `stage` in one eager process."""
        if stage not in self.references:
            out = self.root / "reference" / stage
            assert main(self.argv(stage, "one", out)) == 0
            self.references[stage] = losses(out)
        return self.references[stage]

    def check(self, nproc: int, runs: list[tuple[str, str, bool]]) -> None:
        """Run (stage, layout, compile) combinations of `nproc` processes in one torchrun launch; each must give
        its stage's single-process eager losses."""
        assert all(LAYOUTS[layout][0] == nproc for _, layout, _ in runs)
        self.launches += 1  # each check its own folders: a combination may recur in another check
        outs = [self.root / f"launch-{self.launches}" / f"{stage}-{layout}-{'compiled' if compiled else 'eager'}"
                for stage, layout, compiled in runs]
        jobs = [self.argv(stage, layout, out, compiled) for (stage, layout, compiled), out in zip(runs, outs)]
        if nproc > 1:
            torchrun(nproc, WORKER, "matrix", json.dumps(jobs), timeout=600)
        else:
            with aot_eager_compile():
                for argv in jobs:
                    assert main(argv) == 0, argv
        for (stage, layout, compiled), out in zip(runs, outs):
            got, want = losses(out), self.reference(stage)
            assert len(got) == STEPS, (stage, layout, compiled)
            try:
                assert_same_losses(got, want)
            except AssertionError as e:
                raise AssertionError(f"{stage} under {layout}, compile={compiled}: {e}") from None


@contextmanager
def aot_eager_compile():
    """compile=true compiles with aot_eager in this process, as the worker does under torchrun."""
    import torch

    from seekmoe.parallel import compile as compile_options

    defaults = compile_options.apply_compute_options.__kwdefaults__
    saved = defaults["compile_backend"]
    defaults["compile_backend"] = "aot_eager"
    try:
        yield
    finally:
        defaults["compile_backend"] = saved
        torch._dynamo.reset()


@pytest.fixture(scope="module")
def stages(corpus, cache, tmp_path_factory) -> Stages:
    return Stages(tmp_path_factory.mktemp("matrix"), corpus, cache)


def test_every_router_and_stage_under_two_processes_reproduces_one_process(stages):
    """The default run's subset: each router under one multi-process layout, compile on once, every stage, and the
    capacity/local balance loss case (all in one 2-process launch)."""
    stages.check(2, [("pretrain-deepseek", "ep2", False), ("pretrain-switch", "dp2", False),
                     ("pretrain-gshard", "ep2", False), ("pretrain-deepseek", "dp2", True),
                     ("local", "dp2", False), ("extend", "ep2", False), ("sft", "dp2", False),
                     ("grow", "ep2", False)])


@pytest.mark.slow
def test_full_matrix_under_two_processes(stages):
    """Every router under FSDP dp=2 and EP=2, compiled and not; every other stage under both (one launch)."""
    runs = [(f"pretrain-{router}", layout, compiled) for router in ROUTERS for layout in ("dp2", "ep2")
            for compiled in (False, True)]
    runs += [(stage, layout, False) for stage in ("extend", "sft", "grow") for layout in ("dp2", "ep2")]
    stages.check(2, runs + [("local", "ep2", False), ("grow", "ep2", True)])


@pytest.mark.slow
def test_full_matrix_under_dp2_x_ep2(stages):
    """Every router compiled and not, and every other stage, on 4 processes: FSDP over 2 x EP over 2 (one launch)."""
    runs = [(f"pretrain-{router}", "dp2xep2", compiled) for router in ROUTERS for compiled in (False, True)]
    stages.check(4, runs + [(stage, "dp2xep2", False) for stage in ("extend", "sft", "grow")])


@pytest.mark.slow
@pytest.mark.parametrize("router", list(ROUTERS))
def test_compiled_one_process_reproduces_eager(stages, router):
    """compile=true in one process (aot_eager) gives the eager losses."""
    stages.check(1, [(f"pretrain-{router}", "one", True)])
