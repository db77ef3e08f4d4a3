"""Cost as the context grows: prefill time against prompt length, and decode tokens/s against context length, of
seekmoe (MLA's absorbed latent cache; eager and torch.compile'd decode) and transformers' `generate` (per-head keys
and values) on the same random checkpoint, batch 1, greedy.

For a context of L tokens the prompt is L random ids. Prefill time is the time to the first token (a generation of
1 token); decode tokens/s is N / (time of N + 1 tokens - time of 1 token), so prefill cancels out. Engines run
interleaved, median of --repeats rounds after a warmup.

    python benchmarks/context_speed.py                 # small preset, contexts 256 .. 16K: ~10 min
    python benchmarks/context_speed.py --quick         # contexts 256 and 1K, smoke run
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, header, median_times, pyplot, save_figure, table, write_json  # noqa: E402
from decode import load_transformers  # noqa: E402

import seekmoe  # noqa: E402
from seekmoe import ModelConfig  # noqa: E402
from seekmoe.inference import Engine, SamplingParams  # noqa: E402


class SeekmoeGenerate:
    """seekmoe generating `new_tokens` after one prompt, the whole prompt prefilled in one chunk."""

    def __init__(self, model, prompt: list[int], new_tokens: int, compile: bool):
        self.engine = Engine(model, max_batch_size=1, max_seq_len=len(prompt) + new_tokens + 1,
                             max_prefill_tokens=len(prompt), compile=compile)
        self.prompt, self.params = prompt, SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)

    def __call__(self) -> list[int]:
        return self.engine.generate([self.prompt], self.params)[0].output_ids


class TransformersGenerate:
    def __init__(self, model, prompt: list[int], new_tokens: int):
        self.model, self.ids, self.new_tokens = model, torch.tensor([prompt]), new_tokens

    def __call__(self) -> list[int]:
        with torch.inference_mode():
            out = self.model.generate(self.ids, attention_mask=torch.ones_like(self.ids), do_sample=False,
                                      use_cache=True, max_new_tokens=self.new_tokens,
                                      min_new_tokens=self.new_tokens, pad_token_id=0)
        return out[0, self.ids.shape[1]:].tolist()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small", help="preset of the random model (default small)")
    p.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 4096, 16384],
                   help="prompt lengths in tokens (default 256 1024 4096 16384)")
    p.add_argument("--new-tokens", type=int, default=32, help="decoded tokens timed at each context (default 32)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds after one warmup (default 3)")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled seekmoe engine")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline")
    p.add_argument("--quick", action="store_true", help="contexts 256 and 1024, 8 new tokens, 1 repeat")
    p.add_argument("--out", type=Path, default=RESULTS / "context_speed.json", help="where the JSON results go")
    args = p.parse_args(argv)
    if args.quick:
        args.contexts, args.new_tokens, args.repeats = [256, 1024], 8, 1
    if min(args.contexts) < 2 or args.new_tokens < 1:
        p.error("contexts must be at least 2 tokens and --new-tokens at least 1")

    config = ModelConfig.preset(args.preset, max_position_embeddings=max(args.contexts) + args.new_tokens + 2)
    torch.manual_seed(0)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        seekmoe.build_model(config).save_pretrained(tmp)
        model = seekmoe.from_pretrained(tmp).eval()
        hf_model = None if args.no_transformers else load_transformers(Path(tmp), torch.float32)
    print(header("seekmoe prefill and decode cost against context length"))
    print(f"random {args.preset} model (fp32), {config.num_hidden_layers} layers, {config.num_attention_heads} heads, "
          f"kv_lora_rank {config.kv_lora_rank} + qk_rope_head_dim {config.qk_rope_head_dim}; batch 1, greedy, "
          f"{args.new_tokens} decoded tokens, median of {args.repeats}\n")
    engines = ["seekmoe"] + ([] if args.no_compile else ["seekmoe compiled"]) + \
              ([] if hf_model is None else ["transformers generate"])
    for length in args.contexts:
        g = torch.Generator().manual_seed(length)
        prompt = torch.randint(2, config.vocab_size, (length,), generator=g).tolist()
        runs = {}
        for name in engines:
            for n in (1, args.new_tokens + 1):
                if name == "transformers generate":
                    runs[name, n] = TransformersGenerate(hf_model, prompt, n)
                else:
                    runs[name, n] = SeekmoeGenerate(model, prompt, n, compile=name.endswith("compiled"))
        seconds = median_times({key: run for key, run in runs.items()}, args.repeats)
        reference = runs["seekmoe", args.new_tokens + 1]()
        for name in engines:
            prefill, full = seconds[name, 1], seconds[name, args.new_tokens + 1]
            results.append({"engine": name, "context": length, "prefill_s": prefill,
                            "decode_tokens_per_s": args.new_tokens / max(full - prefill, 1e-9),
                            "same_tokens": runs[name, args.new_tokens + 1]() == reference})
        print(f"  done context {length}", flush=True)

    by = {(r["engine"], r["context"]): r for r in results}
    hf = "transformers generate" if hf_model is not None else None
    rows = [["context", "engine", "prefill ms", "prefill tokens/s", "decode tokens/s", "decode vs transformers",
             "same tokens"]]
    for r in results:
        base = by.get((hf, r["context"])) if hf else None
        rows.append([str(r["context"]), r["engine"], f"{1e3 * r['prefill_s']:.0f}",
                     f"{r['context'] / r['prefill_s']:.0f}", f"{r['decode_tokens_per_s']:.1f}",
                     f"{r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x" if base else "-",
                     "yes" if r["same_tokens"] else "no"])
    print()
    print(table(rows))
    plt = pyplot()
    if plt is not None:
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        for name in engines:
            xs = [r["context"] for r in results if r["engine"] == name]
            left.plot(xs, [by[name, x]["prefill_s"] for x in xs], marker="o", label=name)
            right.plot(xs, [by[name, x]["decode_tokens_per_s"] for x in xs], marker="o", label=name)
        for ax, title in ((left, "prefill seconds vs prompt length"), (right, "decode tokens/s vs context")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("tokens")
            ax.set_title(title)
            ax.legend()
        left.set_yscale("log")
        print(f"plot: {save_figure(fig, args.out.with_suffix('.png'))}")
    write_json(args.out, {"preset": args.preset, "new_tokens": args.new_tokens, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
