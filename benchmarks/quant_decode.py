"""Decode tokens/s at batch 1 in fp32, bf16, int8 and int4 weights, eager and compiled, next to the memory-bandwidth
limit: the bytes of weights one token reads, divided by this machine's measured copy bandwidth (issue 24).

A decoding step at batch 1 reads every weight it uses once, so its speed limit is bandwidth / bytes per token: all
attention, dense and shared-expert weights and the output head, num_experts_per_tok of each MoE layer's routed
experts, and one embedding row; int8/int4 modules count their codes and scales (seekmoe.quant). The bandwidth is
`dst.copy_(src)` of a 512 MiB buffer with the same threads (bytes copied per second, best of 5). "of limit" is the
measured rate over that limit; "same tokens" compares the greedy tokens with fp32's (random weights, so bf16 and
int4 rounding may change some).

Models (random weights): "289M" is issue 24's shape (hidden 1024, 6 layers of which 5 MoE, 64 routed experts top-6,
expert width 256, one shared expert: 289M parameters, 61M active), "small" the `small` preset.

    python benchmarks/quant_decode.py                               # everything, 2 threads (minutes: 16 compiles)
    python benchmarks/quant_decode.py --models small --precisions fp32,int8 --modes eager --tokens 16   # a check
    python benchmarks/quant_decode.py --kernels                     # the experts' kernels alone, 1 thread

llama.cpp columns: with llama-cpp-python importable and --gguf DIR holding `{model}-{f32,f16,q8_0,q4_k_m}.gguf`
(converted from the same folders, see benchmarks/README.md), the same prompt is timed through llama_cpp.Llama with
the same threads; otherwise the columns say "-".
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, header, table, write_json  # noqa: E402

import seekmoe  # noqa: E402
from seekmoe import ModelConfig  # noqa: E402
from seekmoe.inference import Engine, SamplingParams  # noqa: E402
from seekmoe.inference import Request  # noqa: E402
from seekmoe.model.experts import RoutedExperts  # noqa: E402
from seekmoe.quant import QuantSpec, QuantizedExperts, configure_quantized, quantize_model  # noqa: E402
from seekmoe.quant.modules import QuantizedEmbedding  # noqa: E402

SHAPES = {
    "289M": dict(hidden_size=1024, num_hidden_layers=6, first_k_dense_replace=1, n_routed_experts=64,
                 num_experts_per_tok=6, moe_intermediate_size=256, n_shared_experts=1, n_group=1, topk_group=1,
                 intermediate_size=2688, num_attention_heads=16, q_lora_rank=None, kv_lora_rank=256,
                 qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, num_nextn_predict_layers=0),
    "small": dict(num_nextn_predict_layers=0),
}
PRECISIONS = ("fp32", "bf16", "int8", "int4")
GGUF_NAMES = {"fp32": "f32", "bf16": "f16", "int8": "q8_0", "int4": "q4_k_m"}


def build(shape: str, precision: str, base) -> torch.nn.Module:
    """The model of `shape` in `precision`, from the fp32 `base` (same weights in every precision)."""
    model = copy.deepcopy(base)
    if precision == "bf16":
        return model.to(torch.bfloat16)
    if precision in ("int8", "int4"):
        quantize_model(model, QuantSpec(precision))
    return model


def bytes_per_token(model) -> int:
    """Bytes of weights one decoding step at batch 1 reads (see the module docstring)."""
    share: dict[str, float] = {}  # module name -> the fraction of its tensors' bytes a token reads
    for name, module in model.named_modules():
        if isinstance(module, (RoutedExperts, QuantizedExperts)):
            share[name] = model.config.num_experts_per_tok / module.n_experts
        elif isinstance(module, torch.nn.Embedding):
            share[name] = 1 / module.num_embeddings
        elif isinstance(module, QuantizedEmbedding):
            share[name] = 1 / module.weight.qweight.shape[0]
    total = 0.0
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    for name, t in tensors:  # named_* list a tied tensor once, under its first name (the embedding's)
        if name.startswith("model.mtp") or "rotary" in name:
            continue
        owner = max((m for m in share if name.startswith(m + ".")), key=len, default=None)
        total += t.nbytes * (share[owner] if owner is not None else 1)
    if model.config.tie_word_embeddings and isinstance(model.lm_head, torch.nn.Linear):
        total += model.lm_head.weight.nbytes  # the head reads the whole tied matrix
    return int(total)


def copy_bandwidth() -> float:
    """Bytes a second that dst.copy_(src) moves over a 512 MiB buffer (best of 5)."""
    src = torch.ones(128 * 2**20)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return src.nbytes / best


def decode_rate(model, prompt: list[int], tokens: int, compile: bool) -> tuple[float, list[int], float]:
    """(decode tokens/s at batch 1 after the prefill step, the greedy tokens, seconds spent compiling)."""
    configure_quantized(model, compile)
    engine = Engine(model, max_batch_size=1, max_seq_len=len(prompt) + tokens + 2, compile=compile)
    params = SamplingParams(max_new_tokens=tokens, temperature=0, ignore_eos=True)
    engine.generate([prompt], SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True))  # compile here
    request = engine.add(Request(list(prompt), params))
    engine.step()  # the prefill and the first token
    start = time.perf_counter()
    while not request.done:
        engine.step()
    seconds = time.perf_counter() - start
    if request.finish_reason != "length":
        raise RuntimeError(f"decoding failed: {request.error}")
    return (len(request.output_ids) - 1) / seconds, request.output_ids, engine.forwards.compile_seconds


def llama_cpp_rate(gguf: Path, prompt: list[int], tokens: int, threads: int) -> float | None:
    """llama.cpp's decode tokens/s on the same prompt (None without llama-cpp-python or the file)."""
    try:
        import llama_cpp
    except ImportError:
        return None
    if not gguf.is_file():
        return None
    llm = llama_cpp.Llama(str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=len(prompt) + tokens + 8,
                          verbose=False)
    llm.eval(prompt)
    start = time.perf_counter()
    for _ in range(tokens - 1):
        token = llm.sample(temp=0.0)
        llm.eval([token])
    return (tokens - 1) / (time.perf_counter() - start)


def expert_kernels(threads: int) -> list[list[str]]:
    """The routed experts' decode step alone at the 289M shapes (6 rows, each through its own expert of 64, widths
    1024 and 256): every way seekmoe or torch offers to multiply by quantized experts, timed in the thread's CPU
    time (steadier than wall time on a shared machine), each call on another random set of experts so that the
    weights come from memory, not cache."""
    import torch.nn.functional as F

    from seekmoe.model.grouped_swiglu import gathered_swiglu
    from seekmoe.quant import quantize
    from seekmoe.quant.kernels import gathered_quantized_swiglu

    H, I, E, K = 1024, 256, 64, 6
    gen = torch.Generator().manual_seed(0)
    gate_up, down = torch.randn(E, 2 * I, H, generator=gen) * 0.02, torch.randn(E, H, I, generator=gen) * 0.02
    x, w = torch.randn(K, H, generator=gen), torch.rand(K, generator=gen)
    sets = [torch.randperm(E, generator=gen)[:K] for _ in range(64)]
    calls = iter(range(10**9))

    def experts():
        return sets[next(calls) % len(sets)]

    def timed(fn, n=30):
        for _ in range(3):
            fn()
        times = []
        for _ in range(n):
            start = time.thread_time()
            fn()
            times.append(time.thread_time() - start)
        return sorted(times)[n // 2] if threads == 1 else float("nan")

    runs = {"fp32 gathered, eager": lambda: gathered_swiglu(x, w, gate_up, down, experts())}
    compiled_fp32 = torch.compile(gathered_swiglu, dynamic=False)
    runs["fp32 gathered, compiled"] = lambda: compiled_fp32(x, w, gate_up, down, experts())
    quantized = {}
    for scheme in ("int8", "int4"):
        spec = QuantSpec(scheme)
        q = quantized[scheme] = (quantize(gate_up, spec), quantize(down, spec))
        runs[f"{scheme} seekmoe eager"] = (lambda q=q, s=scheme: gathered_quantized_swiglu(
            x, w, *q, experts(), s, False, torch.float32))
        fused = torch.compile(gathered_quantized_swiglu, dynamic=False)
        runs[f"{scheme} seekmoe fused, compiled"] = (lambda q=q, s=scheme, f=fused: f(
            x, w, *q, experts(), s, True, torch.float32))

    # torch's int4 CPU kernel (torchao's Int4CPULayout calls it): asymmetric groups of 32 in its own packing, one
    # call per row and projection.
    def int4_native(m):
        n, k = m.shape
        g = m.view(n, k // 32, 32)
        lo, hi = g.amin(-1), g.amax(-1)
        scale = (hi - lo).clamp(min=1e-8) / 15
        codes = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).view(n, k)
        return (torch._convert_weight_to_int4pack_for_cpu(codes, 1),
                torch.stack([scale, lo + 8 * scale], -1).transpose(0, 1).contiguous())

    packed = {e: (int4_native(gate_up[e]), int4_native(down[e])) for e in range(E)}

    def native4():
        out = []
        for j, e in enumerate(experts().tolist()):
            (pg, sg), (pd, sd) = packed[e]
            h = torch._weight_int4pack_mm_for_cpu(x[j: j + 1], pg, 32, sg)
            out.append(torch._weight_int4pack_mm_for_cpu(F.silu(h[:, :I]) * h[:, I:] * w[j], pd, 32, sd))
        return torch.cat(out)

    runs["int4 torch _weight_int4pack_mm_for_cpu per row, eager"] = native4
    fp32_bytes = K * 3 * H * I * 4
    rows = [["experts kernel (289M shapes, 1 thread)", "ms", "G weights/s", "GB/s read"]]
    for name, fn in runs.items():
        seconds = timed(fn)
        per_weight = 4 if name.startswith("fp32") else 1 if name.startswith("int8") else 0.5625
        rows.append([name, f"{seconds * 1e3:.2f}", f"{fp32_bytes / 4 / seconds / 1e9:.1f}",
                     f"{fp32_bytes / 4 * per_weight / seconds / 1e9:.1f}"])
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(SHAPES), help=f"comma-separated, of {','.join(SHAPES)}")
    p.add_argument("--precisions", default=",".join(PRECISIONS), help=f"comma-separated, of {','.join(PRECISIONS)}")
    p.add_argument("--modes", default="eager,compiled", help="comma-separated, of eager,compiled")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=64, help="tokens decoded and timed (default 64)")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--gguf", type=Path, default=None, help="folder of {model}-{f32,f16,q8_0,q4_k_m}.gguf files")
    p.add_argument("--kernels", action="store_true",
                   help="only the routed experts' kernels at one thread (which product is fastest), then exit")
    p.add_argument("--out", type=Path, default=RESULTS / "quant_decode.json")
    args = p.parse_args()
    if args.kernels:
        torch.set_num_threads(1)
        print(header("routed experts' decode kernels"))
        print(table(expert_kernels(1)))
        return
    torch.set_num_threads(args.threads)
    print(header(f"decode tokens/s at batch 1, {args.threads} threads, {args.tokens} tokens after a "
                 f"{args.prompt_len}-token prompt"))
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s\n")
    rows = [["model", "precision", "MB/token", "limit tok/s", "eager tok/s", "compiled tok/s", "of limit",
             "llama.cpp tok/s", "same tokens", "compile s"]]
    results = []
    for shape in args.models.split(","):
        torch.manual_seed(0)
        config = ModelConfig.preset("small", **SHAPES[shape])
        base = seekmoe.build_model(config).eval()
        prompt = torch.randint(2, config.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(0))
        prompt = prompt.tolist()
        reference = None
        for precision in args.precisions.split(","):
            model = build(shape, precision, base)
            per_token = bytes_per_token(model)
            limit = bandwidth / per_token
            rates, outputs, compile_s = {}, {}, 0.0
            for mode in args.modes.split(","):
                torch._dynamo.reset()
                rate, out, seconds = decode_rate(model, prompt, args.tokens, mode == "compiled")
                rates[mode], outputs[mode], compile_s = rate, out, compile_s + seconds
            out = next(iter(outputs.values()))
            reference = out if precision == "fp32" else reference
            best = max(rates.values())
            gguf = args.gguf / f"{shape}-{GGUF_NAMES[precision]}.gguf" if args.gguf else Path("-")
            llama = llama_cpp_rate(gguf, prompt, args.tokens, args.threads)
            row = {"model": shape, "precision": precision, "bytes_per_token": per_token, "limit": limit,
                   "eager": rates.get("eager"), "compiled": rates.get("compiled"), "of_limit": best / limit,
                   "llama_cpp": llama, "same_tokens": None if reference is None else out == reference,
                   "compile_s": compile_s}
            results.append(row)
            rows.append([shape, precision, f"{per_token / 1e6:.1f}", f"{limit:.0f}",
                         f"{rates['eager']:.1f}" if "eager" in rates else "-",
                         f"{rates['compiled']:.1f}" if "compiled" in rates else "-", f"{best / limit:.0%}",
                         f"{llama:.1f}" if llama else "-",
                         "-" if row["same_tokens"] is None else ("yes" if row["same_tokens"] else "no"),
                         f"{compile_s:.0f}"])
            print(table(rows), flush=True)
            print()
            del model
    write_json(args.out, {"threads": args.threads, "tokens": args.tokens, "copy_bandwidth": bandwidth,
                          "rows": results})


if __name__ == "__main__":
    main()
