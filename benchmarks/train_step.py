"""Tokens per second of a full training step (forward, backward, AdamW) of seekmoe against transformers'
DeepseekV3ForCausalLM on the same config, weights and batch.

    python benchmarks/train_step.py            # the "small" preset, batch 8 x 256, fp32 and bf16: a few minutes
    python benchmarks/train_step.py --quick    # smoke run

"seekmoe compiled" is `compile=true`: each block torch.compile'd (inductor), its first step's compile time printed
apart; the timed steps reuse the graphs.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, header, median_times, table, write_json  # noqa: E402

import seekmoe  # noqa: E402
from seekmoe.parallel import compile_blocks  # noqa: E402


def training_step(model, ids: torch.Tensor, dtype: torch.dtype | None, setup=None):
    """One optimizer step on the batch `ids` (next-token loss), under bf16 autocast when dtype is given."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        if setup is not None:
            setup()
        optimizer.zero_grad(set_to_none=True)
        autocast = torch.autocast(ids.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        with autocast:
            loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        return loss

    return step


def build_models(config: seekmoe.ModelConfig):
    """seekmoe's model and transformers' model loaded from the checkpoint seekmoe saved: the same weights."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    ours = seekmoe.build_model(config).train()
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(tmp)
        theirs = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, attn_implementation="sdpa").train()
    return ours, theirs


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated, of fp32,bf16")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per model (median reported)")
    parser.add_argument("--quick", action="store_true", help="smoke run: batch 2 x 64, 2 repeats, fp32")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled seekmoe model")
    parser.add_argument("--out", type=Path, default=RESULTS / "train_step.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.seq, args.repeats, args.dtypes = 2, 64, 2, "fp32"

    # transformers trains no MTP modules and adds no balance loss: switch both off so the work is the same.
    config = seekmoe.ModelConfig.preset(args.preset, num_nextn_predict_layers=0, aux_loss_alpha=0.0)
    ours, theirs = build_models(config)
    compiled = None
    if not args.no_compile:
        compiled = seekmoe.build_model(config).train()
        compiled.load_state_dict(ours.state_dict())
        compile_blocks(compiled)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs.set_experts_implementation("grouped_mm")
        loss_ours, loss_theirs = ours(ids, labels=ids).loss.item(), theirs(ids, labels=ids).loss.item()

    print(header(f"Training step (forward + backward + AdamW), preset {args.preset!r}, batch {args.batch} x "
                 f"{args.seq} tokens: tokens/s"))
    tokens = args.batch * args.seq
    rows, results = [["dtype", "model", "ms/step", "tokens/s", "vs transformers eager", "vs transformers grouped_mm"]], []
    for dtype_name in args.dtypes.split(","):
        dtype = {"fp32": None, "bf16": torch.bfloat16}[dtype_name]
        steps = {"seekmoe": training_step(ours, ids, dtype)}
        compile_s = None
        if compiled is not None:
            steps["seekmoe compiled"] = training_step(compiled, ids, dtype)
            start = time.perf_counter()
            steps["seekmoe compiled"]()  # compiles this dtype's graphs
            compile_s = time.perf_counter() - start
        for impl in ("eager", "grouped_mm"):
            steps[f"transformers {impl}"] = training_step(theirs, ids, dtype,
                                                          setup=lambda i=impl: theirs.set_experts_implementation(i))
        times = median_times(steps, args.repeats)
        for name, seconds in times.items():
            rows.append([dtype_name, name, f"{1e3 * seconds:.0f}", f"{tokens / seconds:.0f}",
                         f"{times['transformers eager'] / seconds:.2f}x",
                         f"{times['transformers grouped_mm'] / seconds:.2f}x"])
        results.append({"dtype": dtype_name, "seconds": times, "tokens_per_step": tokens, "compile_s": compile_s})
        print(f"  done {dtype_name}" + (f" (first compiled step, compiling: {compile_s:.1f}s)" if compile_s else ""),
              flush=True)
    print()
    print(table(rows))
    print(f"\nsame weights: first-batch loss seekmoe {loss_ours:.6f}, transformers {loss_theirs:.6f}")
    write_json(args.out, {"preset": args.preset, "batch": args.batch, "seq": args.seq, "results": results})


if __name__ == "__main__":
    main()
