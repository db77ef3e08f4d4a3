"""Fairness of the server's scheduler, in engine steps (not seconds, so a loaded machine does not change it): one
request of 64 prompts x 400 tokens and, right after it, one of 8 tokens, on 8 slots prefilling 64 tokens a step
(`seekmoe serve`'s defaults); each prompt generates 16 tokens greedily.

    python benchmarks/serve_fairness.py                       # this tree
    PYTHONPATH=/tmp/old/src python benchmarks/serve_fairness.py --label old   # another checkout's scheduler
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from common import RESULTS, header, table, write_json  # noqa: E402
from test_inference_tokenizer import make_model_dir  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from seekmoe.inference import Engine, SamplingParams
    from seekmoe.inference.engine import Request
    from seekmoe.serve.metrics import Metrics
    from seekmoe.serve.scheduler import Scheduler

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--label", default="this tree")
    p.add_argument("--out", type=Path, default=RESULTS / "serve_fairness.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print(header("scheduler fairness (engine steps)"))
    model = make_model_dir(Path(tempfile.mkdtemp()), max_position_embeddings=1024)
    engine = Engine.from_pretrained(model, max_batch_size=8, max_prefill_tokens=64)
    scheduler = Scheduler(engine, Metrics(), max_queue=128)
    steps, finished = [0], {}
    step = engine.step

    def counted():
        steps[0] += 1
        return step()

    def deliver(event):
        if event.finished:
            finished[event.request.id] = steps[0]

    engine.step = counted
    params = SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True)
    big = [Request([5 + i % 50] * 400, params) for i in range(64)]
    short = Request([7] * 8, params)
    scheduler.submit(big, deliver)
    scheduler.submit([short], deliver)
    start = time.perf_counter()
    scheduler.start()
    while len(finished) < len(big) + 1:
        time.sleep(0.05)
    scheduler.stop()
    result = {"label": args.label, "short_finished_at_step": finished[short.id],
              "long_finished_at_step": max(finished[r.id] for r in big), "seconds": time.perf_counter() - start}
    print(table([["scheduler", "8-token request done at step", "64 x 400-token request done at step"],
                 [args.label, str(result["short_finished_at_step"]), str(result["long_finished_at_step"])]]))
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
