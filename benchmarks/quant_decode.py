"""Decode tokens/s at batch 1 in fp32, bf16, int8 and int4 weights, eager and compiled, next to the memory-bandwidth
limit: the bytes of weights one token reads, divided by this machine's measured read bandwidth (issue 24).

A decoding step at batch 1 reads every weight it uses once, so its speed limit is bandwidth / bytes per token: all
attention, dense and shared-expert weights and the output head, num_experts_per_tok of each MoE layer's routed
experts, and one embedding row; int8/int4 modules count their codes and scales (seekmoe.quant). The bandwidth is
`src.sum()` over a 512 MiB buffer with the same threads (bytes read per second, best of 5): a decode step only
reads its weights, and a copy, which also writes each byte, measured 1.7-2.5x less (llama.cpp then ran above 100%
of a copy-based limit); the copy's rate is printed and kept in the JSON too. "of limit" is the
measured rate over that limit; "same tokens" compares the greedy tokens with fp32's (random weights, so bf16 and
int4 rounding may change some).

Models (random weights): "289M" is issue 24's shape (hidden 1024, 6 layers of which 5 MoE, 64 routed experts top-6,
expert width 256, one shared expert: 289M parameters, 61M active), "small" the `small` preset.

    python benchmarks/quant_decode.py                               # everything, 2 threads (minutes: 16 compiles)
    python benchmarks/quant_decode.py --models small --precisions fp32,int8 --modes eager --tokens 16   # a check
    python benchmarks/quant_decode.py --kernels                     # the experts' and a linear's kernels, 1 thread
    python benchmarks/quant_decode.py --kernels --vnni-probe        # + a hand-written integer int4 kernel (C++)

llama.cpp columns (with llama-cpp-python importable; --no-llama skips them): the same fp32 weights are saved as a
folder and exported with seekmoe's own GGUF writer (`seekmoe export --format gguf`) to F32, BF16, F16 and Q8_0;
Q4_K_M and Q4_0 are made from the F32 file by llama.cpp's own quantizer (llama_model_quantize, its default
parameters). Each file decodes the same prompt greedily with n_threads = the torch threads; only the one-token
eval calls after the prompt are timed (the prompt's eval is not). Rows pair precisions with formats: fp32-F32,
bf16-BF16 and F16, int8-Q8_0, int4-Q4_K_M and Q4_0. "llama = seekmoe" counts the leading greedy tokens llama.cpp
shares with seekmoe at the same precision; F32 must match fp32 over the first 16 tokens (the script exits 1
otherwise, after writing its JSON; the F32 file runs with an F32 KV cache for that, the others with llama.cpp's
default F16 cache); in the other formats rounding may flip a near-tie, which is reported, not asserted.
"% of limit" uses seekmoe's bytes per token for both engines (Q4_K_M keeps a few tensors in 6 bits, so its own
limit is a little lower).

    python benchmarks/quant_decode.py --quick --threads 1                 # small only, eager, 16 tokens: < 1 min
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
# The llama.cpp file types compared with each seekmoe precision: written by seekmoe's exporter, or (None) made by
# llama.cpp's quantizer from the F32 file with the named LLAMA_FTYPE_MOSTLY_* type.
GGUF_FORMATS = {"fp32": ("f32",), "bf16": ("bf16", "f16"), "int8": ("q8_0",), "int4": ("q4_k_m", "q4_0")}
LLAMA_QUANTIZED = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0"}
EXACT_TOKENS = 16  # F32 llama.cpp must give fp32 seekmoe's first 16 greedy tokens


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


def read_bandwidth() -> float:
    """Bytes a second that src.sum() reads over a 512 MiB buffer (best of 5): the rate a decode step's weight reads
    can reach (a sum does one add a float, far below what a core computes, so memory sets its speed)."""
    src = torch.ones(128 * 2**20)
    src.sum()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        src.sum()
        best = min(best, time.perf_counter() - start)
    return src.nbytes / best


def copy_bandwidth() -> float:
    """Bytes a second that dst.copy_(src) moves over a 512 MiB buffer (best of 5): each byte read once and written
    once, so about half what reading alone reaches."""
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


def gguf_files(base, shape: str, folder: Path, formats: list[str]) -> dict[str, Path]:
    """`{shape}-{format}.gguf` in `folder` for each format, from the fp32 model `base`: saved as a model folder with a
    byte-level tokenizer (llama.cpp needs one; the benchmark feeds token ids), exported by seekmoe's GGUF writer,
    the Q4 types quantized from the F32 file by llama.cpp. Files already there are reused."""
    import inspect
    import json

    import llama_cpp
    from llama_cpp import _logger as llama_logger
    from llama_cpp._utils import suppress_stdout_stderr

    from seekmoe.data.tokenizer import train_tokenizer
    from seekmoe.gguf_export import GGUF_TYPES, export_gguf

    model_dir = folder / shape
    if not (model_dir / "tokenizer.json").is_file():
        base.save_pretrained(model_dir)
        tokenizer = train_tokenizer([inspect.getsource(json)], min(512, base.config.vocab_size))
        tokenizer.save(str(model_dir / "tokenizer.json"))
    files = {}
    for fmt in ["f32"] + formats:  # the quantizer reads the F32 file
        path = files[fmt] = folder / f"{shape}-{fmt}.gguf"
        if path.is_file():
            continue
        if fmt in GGUF_TYPES:
            export_gguf(model_dir, path, fmt)
        else:
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, LLAMA_QUANTIZED[fmt])
            # Silenced (its log through llama-cpp-python's logger, its printf lines by the file descriptors): a line
            # per tensor; the fallbacks it reports are summed up by tensor_types below instead.
            llama_logger.set_verbose(False)
            with suppress_stdout_stderr(disable=False):
                status = llama_cpp.llama_model_quantize(str(files["f32"]).encode(), str(path).encode(), params)
            if status != 0:
                raise RuntimeError(f"llama_model_quantize failed to write {path} (status {status})")
    return files


def tensor_types(gguf_file: Path) -> dict[str, int]:
    """How many of the file's weights (elements) are stored in each GGML type: where llama.cpp's Q4_K_M falls back
    to Q5_0/F16 for rows not a multiple of 256 (most of `small`), the "4-bit" file is not 4-bit."""
    import gguf

    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(gguf_file).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + int(t.n_elements)
    return counts


def llama_cpp_rate(gguf: Path, prompt: list[int], tokens: int, threads: int) -> tuple[float, list[int]]:
    """(llama.cpp's decode tokens/s at batch 1 on the same prompt, its greedy tokens): the prompt in one batch, then
    `tokens` - 1 one-token evals, only those timed, after a warmup decode of 4 tokens."""
    import numpy as np

    import llama_cpp

    f32_cache = {"type_k": 0, "type_v": 0} if gguf.name.endswith("-f32.gguf") else {}  # 0 = GGML_TYPE_F32
    llm = llama_cpp.Llama(str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=len(prompt) + tokens + 8,
                          n_batch=max(len(prompt), 8), verbose=False, **f32_cache)
    n_vocab = llm.n_vocab()

    def greedy() -> int:  # the last eval's logits (one row: only its last token asked for them)
        return int(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,)).argmax())

    def run(n: int) -> tuple[float, list[int]]:
        llm.reset()
        llm.eval(prompt)
        out, seconds = [greedy()], 0.0
        while len(out) < n:
            start = time.perf_counter()
            llm.eval([out[-1]])
            seconds += time.perf_counter() - start
            out.append(greedy())
        return seconds, out

    run(4)
    seconds, out = run(tokens)
    llm.close()
    return (tokens - 1) / seconds, out


def leading_equal(a: list[int], b: list[int]) -> int:
    """How many tokens a and b share from the start."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


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

    def timed(fn):
        return expert_timed(fn, threads)

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


def linear_kernels(threads: int) -> list[list[str]]:
    """One decode row through a 1024 -> 1536 linear (the 289M model's q_proj; attention, dense and shared-expert
    linears are most of a token's bytes besides the routed experts), in each path seekmoe has, timed as
    expert_kernels times, each call another of 8 weights so that they come from memory, not cache."""
    import torch.nn.functional as F

    from seekmoe.quant import quantize
    from seekmoe.quant.kernels import quantized_linear

    out, inp, copies = 1536, 1024, 8
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(out, inp, generator=gen) * 0.02 for _ in range(copies)]
    x = torch.randn(1, inp, generator=gen)
    calls = iter(range(10**9))

    def pick(items):
        return items[next(calls) % copies]

    runs = {"fp32 F.linear, eager": lambda: F.linear(x, pick(weights))}
    for scheme in ("int8", "int4"):
        q = [quantize(w, QuantSpec(scheme)) for w in weights]
        what = "int8 activations x codes (_int_mm)" if scheme == "int8" else "dequantize, F.linear"
        runs[f"{scheme} seekmoe eager ({what})"] = lambda q=q, s=scheme: quantized_linear(x, *pick(q), s, False)
        fused = torch.compile(quantized_linear, dynamic=False)
        runs[f"{scheme} seekmoe fused, compiled"] = lambda q=q, s=scheme, f=fused: f(x, *pick(q), s, True)
        if scheme == "int8":
            runs["int8 torch _weight_int8pack_mm, eager"] = lambda q=q: torch._weight_int8pack_mm(x, *pick(q))
    rows = [["linear kernel (1024 -> 1536, 1 row, 1 thread)", "ms", "G weights/s", "GB/s read"]]
    for name, fn in runs.items():
        seconds = expert_timed(fn, threads)
        per_weight = 4 if name.startswith("fp32") else 1 if name.startswith("int8") else 0.5625
        rows.append([name, f"{seconds * 1e3:.3f}", f"{out * inp / seconds / 1e9:.1f}",
                     f"{out * inp * per_weight / seconds / 1e9:.1f}"])
    return rows


# What integer dot products would give int4 (not a seekmoe path: a measurement for benchmarks/README.md's "what
# limits us"): llama.cpp's Q4_0 x Q8_0 scheme written by hand — each row rounded to int8 per 32 inputs, the 32 codes
# of a group (halves order: a mask and a shift) times them in one VPDPBUSD (AVX512-VNNI; two VPMADDUBSW/VPMADDWD
# steps on AVX2), one float multiply-add a group. Built with torch's C++ extension loader (a compiler and ninja).
_VNNI_PROBE = r"""
#include <torch/extension.h>
#include <immintrin.h>
#include <cmath>
#include <vector>
static inline __m256i dot_u8_s8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}
torch::Tensor q4_rows(torch::Tensor x, torch::Tensor qw, torch::Tensor sc, torch::Tensor expert) {
  const int64_t M = x.size(0), in = x.size(1), out = qw.size(1), G = in / 32;
  auto y = torch::empty({M, out}, x.options());
  std::vector<int8_t> xq(in); std::vector<float> xs(G); std::vector<int32_t> xsum(G);
  const float* xp = x.data_ptr<float>(); const uint8_t* qp = qw.data_ptr<uint8_t>();
  const at::Half* sp = sc.data_ptr<at::Half>(); const int64_t* ep = expert.data_ptr<int64_t>();
  float* yp = y.data_ptr<float>();
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < G; ++g) {
      float amax = 0;
      for (int k = 0; k < 32; ++k) amax = std::max(amax, std::fabs(xp[m * in + g * 32 + k]));
      const float d = amax > 0 ? amax / 127.f : 1.f;
      int32_t sum = 0;
      for (int k = 0; k < 32; ++k) {
        const int v = (int)std::nearbyint(xp[m * in + g * 32 + k] / d);
        xq[g * 32 + k] = (int8_t)v; sum += v;
      }
      xs[g] = d; xsum[g] = sum;
    }
    const uint8_t* W = qp + ep[m] * out * (in / 2);
    const at::Half* S = sp + ep[m] * out * G;
    for (int64_t o = 0; o < out; ++o) {
      __m256 acc = _mm256_setzero_ps(); float offset = 0;
      for (int64_t g = 0; g < G; ++g) {
        const __m128i p = _mm_loadu_si128((const __m128i*)(W + o * (in / 2) + g * 16));
        const __m256i codes = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(p, 4), p), low4);
        const __m256i dot = dot_u8_s8(codes, _mm256_loadu_si256((const __m256i*)(xq.data() + g * 32)));
        const float d = (float)S[o * G + g] * xs[g];
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(d), acc);
        offset += d * 8 * xsum[g];
      }
      __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
      h = _mm_hadd_ps(h, h); h = _mm_hadd_ps(h, h);
      yp[m * out + o] = _mm_cvtss_f32(h) - offset;
    }
  }
  return y;
}
"""


def vnni_probe(threads: int) -> list[list[str]]:
    """The experts' int4 decode step (expert_kernels' shapes and timing) through _VNNI_PROBE, next to seekmoe's
    fused compiled product, and its error against that float product (from rounding the activations)."""
    import tempfile

    import torch.nn.functional as F
    from torch.utils.cpp_extension import load_inline

    from seekmoe.quant import quantize
    from seekmoe.quant.kernels import gathered_quantized_swiglu

    build = Path(tempfile.gettempdir()) / "seekmoe_q4_probe"
    build.mkdir(exist_ok=True)
    native = load_inline("seekmoe_q4_probe", cpp_sources=_VNNI_PROBE, functions=["q4_rows"],
                         extra_cflags=["-O3", "-march=native"], build_directory=str(build))
    H, I, E, K = 1024, 256, 64, 6
    gen = torch.Generator().manual_seed(0)
    spec = QuantSpec("int4")
    gate_up = quantize(torch.randn(E, 2 * I, H, generator=gen) * 0.02, spec)
    down = quantize(torch.randn(E, H, I, generator=gen) * 0.02, spec)
    x, w = torch.randn(K, H, generator=gen), torch.rand(K, generator=gen)
    sets = [torch.randperm(E, generator=gen)[:K] for _ in range(64)]
    calls = iter(range(10**9))

    def experts():
        return sets[next(calls) % len(sets)]

    def probe(expert):
        gate, up = native.q4_rows(x, *gate_up, expert).chunk(2, dim=-1)
        return native.q4_rows((F.silu(gate) * (up * w.unsqueeze(-1))).contiguous(), *down, expert)

    fused = torch.compile(gathered_quantized_swiglu, dynamic=False)
    want = fused(x, w, gate_up, down, sets[0], "int4", True, torch.float32)
    error = ((probe(sets[0]) - want).norm() / want.norm()).item()
    rows = [["int4 experts (289M shapes, 1 thread)", "ms", "GB/s read", "error vs fused"]]
    for name, fn in [("seekmoe fused, compiled", lambda: fused(x, w, gate_up, down, experts(), "int4", True,
                                                                  torch.float32)),
                     ("hand-written Q4_0 x Q8_0 integer dot products", lambda: probe(experts()))]:
        seconds = expert_timed(fn, threads)
        rows.append([name, f"{seconds * 1e3:.2f}", f"{K * 3 * H * I * 0.5625 / seconds / 1e9:.1f}",
                     "-" if name.startswith("seekmoe") else f"{error:.2%}"])
    return rows


def expert_timed(fn, threads: int, n: int = 30) -> float:
    """Median CPU time of the calling thread over n calls of fn, after 3 warmups (nan unless one thread)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(n):
        start = time.thread_time()
        fn()
        times.append(time.thread_time() - start)
    return sorted(times)[n // 2] if threads == 1 else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(SHAPES), help=f"comma-separated, of {','.join(SHAPES)}")
    p.add_argument("--precisions", default=",".join(PRECISIONS), help=f"comma-separated, of {','.join(PRECISIONS)}")
    p.add_argument("--modes", default="eager,compiled", help="comma-separated, of eager,compiled")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=64, help="tokens decoded and timed (default 64)")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--quick", action="store_true",
                   help="a check of the script, not a measurement: small only, eager only, 16 tokens (under a minute)")
    p.add_argument("--gguf", type=Path, default=None,
                   help="folder for the GGUF files (kept and reused; default a temporary folder)")
    p.add_argument("--no-llama", action="store_true", help="skip the llama.cpp columns")
    p.add_argument("--kernels", action="store_true",
                   help="only the routed experts' and one linear's decode kernels at one thread (which product is "
                        "fastest), then exit")
    p.add_argument("--vnni-probe", action="store_true",
                   help="with --kernels: also build and time a hand-written int4 x int8 integer-dot-product kernel "
                        "(llama.cpp's scheme; needs a C++ compiler and ninja; a measurement, not a seekmoe path)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON results (default results/quant_decode.json, quant_decode_quick.json with --quick)")
    args = p.parse_args()
    if args.kernels:
        torch.set_num_threads(1)
        print(header("routed experts' decode kernels"))
        print(table(expert_kernels(1)))
        print(table(linear_kernels(1)))
        if args.vnni_probe:
            print(table(vnni_probe(1)))
        return
    if args.quick:
        args.models, args.modes, args.tokens = "small", "eager", EXACT_TOKENS
        print("--quick: a check of the script (small, eager, 16 tokens), not a measurement")
    out_json = args.out or RESULTS / ("quant_decode_quick.json" if args.quick else "quant_decode.json")
    llama_cpp = None
    if not args.no_llama:
        try:
            import llama_cpp
        except ImportError as e:
            print(f"llama.cpp columns skipped: llama-cpp-python is not importable ({e})")
    torch.set_num_threads(args.threads)
    print(header(f"decode tokens/s at batch 1, {args.threads} threads, {args.tokens} tokens after a "
                 f"{args.prompt_len}-token prompt"))
    llama_info = None
    if llama_cpp is not None:
        llama_info = f"llama-cpp-python {llama_cpp.__version__}: {llama_cpp.llama_print_system_info().decode().strip()}"
        print(llama_info)
    bandwidth, copied = read_bandwidth(), copy_bandwidth()
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s (the limit's), copy {copied / 1e9:.1f} GB/s\n")
    rows = [["model", "precision", "MB/token", "seekmoe compiled", "seekmoe eager", "llama.cpp", "limit tok/s",
             "seekmoe % of limit", "llama.cpp % of limit", "same as fp32", "llama = seekmoe", "compile s"]]
    results = []
    tmp = None
    if llama_cpp is not None and args.gguf is None:
        import tempfile
        tmp = tempfile.TemporaryDirectory(prefix="quant_decode_gguf_")
    gguf_dir = args.gguf or (Path(tmp.name) if tmp else None)
    precisions = args.precisions.split(",")
    failures = []
    for shape in args.models.split(","):
        torch.manual_seed(0)
        config = ModelConfig.preset("small", **SHAPES[shape])
        base = seekmoe.build_model(config).eval()
        prompt = torch.randint(2, config.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(0))
        prompt = prompt.tolist()
        files = {}
        if llama_cpp is not None:
            gguf_dir.mkdir(parents=True, exist_ok=True)
            files = gguf_files(base, shape, gguf_dir, [f for p_ in precisions for f in GGUF_FORMATS[p_]])
        reference = None
        for precision in precisions:
            model = build(shape, precision, base)
            per_token = bytes_per_token(model)
            limit = bandwidth / per_token
            rates, outputs, compile_s = {}, {}, 0.0
            for mode in args.modes.split(","):
                torch._dynamo.reset()
                rate, out, seconds = decode_rate(model, prompt, args.tokens, mode == "compiled")
                rates[mode], outputs[mode], compile_s = rate, out, compile_s + seconds
            out = list(next(iter(outputs.values())))
            reference = out if precision == "fp32" else reference
            best = max(rates.values())
            llama = {}  # format -> {"rate", "tokens", "equal_seekmoe"}
            for fmt in GGUF_FORMATS[precision] if files else ():
                rate, tokens = llama_cpp_rate(files[fmt], prompt, args.tokens, args.threads)
                types = tensor_types(files[fmt])
                llama[fmt] = {"rate": rate, "tokens": tokens, "equal_seekmoe": leading_equal(tokens, out),
                              "equal_fp32": None if reference is None else leading_equal(tokens, reference),
                              "file_bytes": files[fmt].stat().st_size, "tensor_types": types}
                total = sum(types.values())
                print(f"{files[fmt].name}: {files[fmt].stat().st_size / 1e6:.1f} MB, weights in "
                      + ", ".join(f"{k} {v / total:.0%}" for k, v in sorted(types.items(), key=lambda kv: -kv[1])))
                if fmt == "f32" and leading_equal(tokens, out) < min(EXACT_TOKENS, len(out)):
                    failures.append(f"{shape} F32: llama.cpp's greedy tokens leave seekmoe fp32's at token "
                                    f"{leading_equal(tokens, out)} (expected the first {EXACT_TOKENS} equal)")
            llama_best = max((v["rate"] for v in llama.values()), default=None)
            row = {"model": shape, "precision": precision, "bytes_per_token": per_token, "limit": limit,
                   "eager": rates.get("eager"), "compiled": rates.get("compiled"), "of_limit": best / limit,
                   "llama_cpp": llama, "llama_cpp_of_limit": None if llama_best is None else llama_best / limit,
                   "same_tokens": None if reference is None else out == reference, "compile_s": compile_s}
            results.append(row)
            rows.append([shape, precision, f"{per_token / 1e6:.1f}",
                         f"{rates['compiled']:.1f}" if "compiled" in rates else "-",
                         f"{rates['eager']:.1f}" if "eager" in rates else "-",
                         " / ".join(f"{f.upper()} {v['rate']:.1f}" for f, v in llama.items()) or "-",
                         f"{limit:.0f}", f"{best / limit:.0%}",
                         "-" if llama_best is None else f"{llama_best / limit:.0%}",
                         "-" if row["same_tokens"] is None else ("yes" if row["same_tokens"] else "no"),
                         " / ".join(f"{v['equal_seekmoe']}/{len(out)}" for v in llama.values()) or "-",
                         f"{compile_s:.0f}"])
            print(table(rows), flush=True)
            print()
            del model
    write_json(out_json, {"threads": args.threads, "tokens": args.tokens, "prompt_len": args.prompt_len,
                          "quick": args.quick, "read_bandwidth": bandwidth, "copy_bandwidth": copied,
                          "llama_cpp": llama_info,
                          "rows": results, "failures": failures})
    if tmp is not None:
        tmp.cleanup()
    for failure in failures:
        print(f"error: {failure}", file=sys.stderr)
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
