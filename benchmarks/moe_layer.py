"""Forward + backward time of one MoE layer against the dense SwiGLU MLP that does the same arithmetic.

A MoE layer with top_k of E routed experts and n_shared shared experts multiplies every token by the weights of a
dense SwiGLU MLP of width (top_k + n_shared) * moe_intermediate_size; that MLP's time is the ceiling. For each
shape and dtype this prints the time of seekmoe's MoE layer with each routed-experts backend, of transformers'
DeepseekV3MoE holding the same weights (its default per-expert loop, "eager", and its "grouped_mm"), and of that
dense MLP, with the ratio dense_time / moe_time (1.0 = dense speed).

    python benchmarks/moe_layer.py            # small (fp32, bf16), v2-lite-8of64 and v3-8of256 (fp32): a few minutes
    python benchmarks/moe_layer.py --quick    # smoke run
    python benchmarks/moe_layer.py --shapes small,v2-lite-8of64 --dtypes fp32,bf16 --repeats 9
    python benchmarks/moe_layer.py --expert-sweep   # time vs routed experts 8 .. 256 at fixed top-k and width, plot

The sweep holds top-k, expert width, shared experts, hidden size and tokens fixed and multiplies the routed experts:
the activated arithmetic per token is the same in every row, so an MoE layer whose time stays flat keeps the MoE
promise (parameters grow, cost does not).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, header, median_times, pyplot, save_figure, table, write_json  # noqa: E402

from seekmoe import ModelConfig  # noqa: E402
from seekmoe.model.experts import BACKENDS, configure_experts  # noqa: E402
from seekmoe.model.mlp import MLP  # noqa: E402
from seekmoe.model.moe import MoE  # noqa: E402


@dataclass
class Shape:
    """One MoE layer's shape, and the tokens it is timed on."""

    name: str
    n_experts: int
    top_k: int
    hidden: int
    width: int  # moe_intermediate_size
    n_shared: int
    tokens: int
    note: str = ""

    @property
    def dense_width(self) -> int:
        return (self.top_k + self.n_shared) * self.width


# DeepSeek-V2-Lite and V3 layers do not fit a 2-core machine's memory and minutes at full expert count, so those
# rows hold a slice of the experts and tokens in proportion: the hidden size, expert width, top-k and shared
# experts are the real ones, and each expert receives the rows it receives in the full layer at 2048 tokens.
SHAPES = {
    "small": Shape("small", 32, 4, 256, 128, 1, 2048),
    "v2-lite-8of64": Shape("v2-lite-8of64", 8, 6, 2048, 1408, 2, 256,
                           "DeepSeek-V2-Lite layer, 8 of its 64 experts at 256 tokens: each expert gets the "
                           "192 rows it gets in the full layer at 2048 tokens"),
    "v3-8of256": Shape("v3-8of256", 8, 8, 7168, 2048, 1, 64,
                       "DeepSeek-V3 layer, 8 of its 256 experts at 64 tokens: each expert gets the 64 rows it "
                       "gets in the full layer at 2048 tokens"),
    "v2-lite": Shape("v2-lite", 64, 6, 2048, 1408, 2, 2048, "DeepSeek-V2-Lite layer, all 64 experts"),
}
DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def build_layers(shape: Shape):
    """seekmoe's MoE, transformers' DeepseekV3MoE sharing its very parameters, and the dense-equivalent MLP."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    routing = dict(n_routed_experts=shape.n_experts, num_experts_per_tok=shape.top_k, n_group=1, topk_group=1,
                   norm_topk_prob=True, routed_scaling_factor=2.5, moe_intermediate_size=shape.width,
                   n_shared_experts=shape.n_shared, hidden_size=shape.hidden)
    ours = MoE(ModelConfig(vocab_size=8, intermediate_size=shape.dense_width, num_hidden_layers=1,
                           first_k_dense_replace=0, num_attention_heads=1, q_lora_rank=None,
                           scoring_func="sigmoid", topk_method="noaux_tc", aux_loss_alpha=0.0, **routing))
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0.0, 0.02)
        ours.gate.e_score_correction_bias.normal_(0.0, 0.01)
    hf_config = DeepseekV3Config(**routing)
    hf_config._experts_implementation = "grouped_mm"
    theirs = DeepseekV3MoE(hf_config)
    theirs.gate.weight = ours.gate.weight
    theirs.gate.e_score_correction_bias.copy_(ours.gate.e_score_correction_bias)
    theirs.experts.gate_up_proj = ours.experts.gate_up_proj
    theirs.experts.down_proj = ours.experts.down_proj
    for name in ("gate_proj", "up_proj", "down_proj"):
        getattr(theirs.shared_experts, name).weight = getattr(ours.shared_experts, name).weight
    dense = MLP(shape.hidden, shape.dense_width)
    with torch.no_grad():
        for p in dense.parameters():
            p.normal_(0.0, 0.02)
    return ours, theirs, dense


def train_step(layer: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor, dtype: torch.dtype | None):
    """One forward + backward, under bf16 autocast when dtype is given; gradients are dropped first."""

    def step():
        for p in layer.parameters():
            p.grad = None
        x.grad = None
        autocast = torch.autocast(x.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        with autocast:
            y = layer(x)
        y = y[0] if isinstance(y, tuple) else y
        y.backward(dy.to(y.dtype))

    return step


def after(setup, step):
    """step, preceded by setup (which selects the implementation the step is meant to time)."""

    def run():
        setup()
        step()

    return run


def measure(shape: Shape, dtype_name: str, repeats: int) -> dict:
    torch.manual_seed(0)
    ours, theirs, dense = build_layers(shape)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, shape.tokens, shape.hidden, generator=g).requires_grad_()
    dy = torch.randn(1, shape.tokens, shape.hidden, generator=g)
    with torch.no_grad():  # the two MoE layers hold the same weights and compute the same function
        ref = theirs(x)
        agreement = ((ours(x)[0] - ref).abs().max() / ref.abs().max()).item()
    dtype = DTYPES[dtype_name]
    hf_config = theirs.experts.config
    steps = {"dense": train_step(dense, x, dy, dtype)}
    for backend in (b for b in BACKENDS if b != "gathered"):  # gathered is inference-only: no backward
        steps[f"seekmoe {backend}"] = after(lambda b=backend: configure_experts(ours, dtype=dtype, backend=b),
                                           train_step(ours, x, dy, dtype))
    for impl in ("eager", "grouped_mm"):
        steps[f"transformers {impl}"] = after(lambda i=impl: setattr(hf_config, "_experts_implementation", i),
                                              train_step(theirs, x, dy, dtype))
    times = median_times(steps, repeats)
    return {"shape": asdict(shape), "dtype": dtype_name, "seconds": times, "vs_transformers_rel_diff": agreement,
            "dense_over_moe": {k: times["dense"] / t for k, t in times.items() if k != "dense"}}


SWEEP_EXPERTS = (8, 16, 32, 64, 128, 256)


def expert_sweep(base: Shape, counts: tuple[int, ...], repeats: int, out: Path) -> None:
    """Forward + backward time of the MoE layer (seekmoe's automatic backend, transformers' grouped_mm) against
    the number of routed experts, the dense SwiGLU of the same activated width as the yardstick."""
    print(header(f"MoE layer forward + backward vs routed experts: top-{base.top_k}, hidden {base.hidden}, "
                 f"expert width {base.width}, {base.n_shared} shared, {base.tokens} tokens, fp32"))
    results = []
    for n in counts:
        shape = Shape(f"E={n}", n, base.top_k, base.hidden, base.width, base.n_shared, base.tokens)
        torch.manual_seed(0)
        ours, theirs, dense = build_layers(shape)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(1, shape.tokens, shape.hidden, generator=g).requires_grad_()
        dy = torch.randn(1, shape.tokens, shape.hidden, generator=g)
        times = median_times({"dense": train_step(dense, x, dy, None), "seekmoe": train_step(ours, x, dy, None),
                              "transformers grouped_mm": train_step(theirs, x, dy, None)}, repeats)
        results.append({"n_experts": n, "seconds": times})
        print(f"  done E={n}", flush=True)
    first = results[0]["seconds"]
    rows = [["routed experts", "dense ms", "seekmoe ms", f"seekmoe vs E={counts[0]}", "dense / seekmoe",
             "transformers grouped_mm ms", f"transformers vs E={counts[0]}"]]
    for r in results:
        t = r["seconds"]
        rows.append([str(r["n_experts"]), f"{1e3 * t['dense']:.1f}", f"{1e3 * t['seekmoe']:.1f}",
                     f"{t['seekmoe'] / first['seekmoe']:.2f}x", f"{t['dense'] / t['seekmoe']:.2f}",
                     f"{1e3 * t['transformers grouped_mm']:.1f}",
                     f"{t['transformers grouped_mm'] / first['transformers grouped_mm']:.2f}x"])
    print()
    print(table(rows))
    plt = pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in ("seekmoe", "transformers grouped_mm", "dense"):
            ax.plot(counts, [1e3 * r["seconds"][name] for r in results], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("routed experts (top-k and expert width fixed)")
        ax.set_ylabel("forward + backward ms")
        ax.set_ylim(bottom=0)
        ax.legend()
        print(f"plot: {save_figure(fig, out.with_suffix('.png'))}")
    write_json(out, {"shape": asdict(base), "results": results})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="small,v2-lite-8of64,v3-8of256", help=f"comma-separated, of {list(SHAPES)}")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated, of fp32,bf16")
    parser.add_argument("--large-bf16", action="store_true",
                        help="also time bf16 at the large shapes (slow on CPUs without bf16 matrix instructions)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per layer (median reported)")
    parser.add_argument("--large-repeats", type=int, default=2,
                        help="timed runs per layer at the shapes other than small (each takes seconds)")
    parser.add_argument("--quick", action="store_true", help="smoke run: the small shape at 256 tokens, 2 repeats")
    parser.add_argument("--expert-sweep", action="store_true",
                        help=f"time the small shape with {SWEEP_EXPERTS} routed experts instead (a table and a plot)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where the JSON goes (default results/moe_layer.json, or moe_layer_experts.json)")
    args = parser.parse_args(argv)
    if args.expert_sweep:
        counts = SWEEP_EXPERTS[:3] if args.quick else SWEEP_EXPERTS
        base = Shape("small", 8, 4, 256, 128, 1, 512 if args.quick else 2048)
        expert_sweep(base, counts, 2 if args.quick else args.repeats, args.out or RESULTS / "moe_layer_experts.json")
        return
    args.out = args.out or RESULTS / "moe_layer.json"

    names = args.shapes.split(",")
    unknown = [n for n in names if n not in SHAPES] + [d for d in args.dtypes.split(",") if d not in DTYPES]
    if unknown:
        parser.error(f"unknown shape or dtype {unknown}: expected shapes from {list(SHAPES)}, dtypes from "
                     f"{list(DTYPES)}")
    shapes = [SHAPES[n] for n in names]
    repeats = args.repeats
    if args.quick:
        shapes, repeats = [Shape("small", 32, 4, 256, 128, 1, 256)], 2

    print(header("MoE layer forward + backward: milliseconds (dense_time / moe_time)"))
    results, rows = [], []
    for shape in shapes:
        for dtype_name in args.dtypes.split(","):
            if dtype_name == "bf16" and shape.name != "small" and not args.large_bf16:
                continue
            r = measure(shape, dtype_name, repeats if shape.name == "small" else args.large_repeats)
            results.append(r)
            ms = {k: 1e3 * t for k, t in r["seconds"].items()}
            row = [shape.name, dtype_name, str(shape.tokens), f"E={shape.n_experts} k={shape.top_k} "
                   f"H={shape.hidden} I={shape.width} shared={shape.n_shared}", f"{ms['dense']:.1f}"]
            row += [f"{ms[k]:.1f} ({r['dense_over_moe'][k]:.2f})" for k in r["dense_over_moe"]]
            rows.append(row)
            print(f"  done {shape.name} {dtype_name}", flush=True)
    heading = ["shape", "dtype", "tokens", "layer", "dense SwiGLU"] + list(results[0]["dense_over_moe"])
    print()
    print(table([heading] + rows))
    print("\ndense SwiGLU width = (top_k + shared) * I; every layer includes its router and shared experts.")
    for shape in shapes:
        if shape.note:
            print(f"{shape.name}: {shape.note}")
    print("seekmoe and transformers outputs agree to max rel diff "
          f"{max(r['vs_transformers_rel_diff'] for r in results):.1e} (fp32)")
    write_json(args.out, {"results": results})


if __name__ == "__main__":
    main()
