"""Decode throughput and cache size: seekmoe (plain and MTP-speculative) against transformers' `generate`.

For each batch size, every sequence gets a prompt of --prompt-len tokens and generates --new-tokens greedily with
end-of-text ignored, so all engines produce the same number of tokens; tokens/s counts them over the whole call
(prefill included). The engines run interleaved (median of --repeats rounds after a warmup) so that load from other
processes falls on all of them alike. "same tokens" checks the output against plain seekmoe's.

Each seekmoe engine runs eager and torch.compile'd (`--compile`): compiling happens in the warmup round, and its
time is reported apart. With MTP modules, speculative rows draft 1..D tokens a step (D = the model's MTP depth).

    python benchmarks/decode.py                                 # a random `small` model
    python benchmarks/decode.py --model runs/x/final            # a trained one (MTP acceptance is meaningful)
"""

from __future__ import annotations

import argparse
import inspect
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, header, median_times, table, write_json  # noqa: E402

import seekmoe  # noqa: E402
from seekmoe import ModelConfig  # noqa: E402
from seekmoe.inference import Engine, SamplingParams  # noqa: E402
from seekmoe.inference.tokenizer import Tokenizer  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_prompts(model_dir: Path, config: ModelConfig, batch: int, length: int) -> list[list[int]]:
    """`batch` prompts of exactly `length` tokens: Python source through the model's tokenizer when the directory
    has one (a trained model then sees text like its training data), else random ids."""
    if (model_dir / "tokenizer.json").is_file():
        import json

        tok = Tokenizer(model_dir, config.bos_token_id, config.eos_token_id)
        ids = tok.encode(inspect.getsource(argparse) + inspect.getsource(json), add_bos=False)
        stride = max(1, (len(ids) - length) // batch)
        return [[config.bos_token_id] + ids[i * stride: i * stride + length - 1] for i in range(batch)]
    g = torch.Generator().manual_seed(batch)
    return torch.randint(2, config.vocab_size, (batch, length), generator=g).tolist()


class SeekmoeRun:
    """One seekmoe engine generating for fixed prompts; calling it runs the whole batch once."""

    def __init__(self, model, prompts, new_tokens: int, speculative: str | None, compile: bool = False,
                 drafts: int | None = None):
        self.prompts = prompts
        self.params = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
        self.engine = Engine(model, max_batch_size=len(prompts), max_seq_len=len(prompts[0]) + new_tokens + 1,
                             speculative=speculative, compile=compile, num_speculative_tokens=drafts)
        self.requests = []

    def __call__(self) -> None:
        self.requests = self.engine.generate(self.prompts, self.params)

    def stats(self) -> dict:
        r = self.requests
        drafted = sum(x.drafted for x in r)
        return {"tokens_per_forward": sum(len(x.output_ids) for x in r) / sum(x.forwards for x in r),
                "acceptance": sum(x.accepted for x in r) / drafted if drafted else None,
                "cache_bytes_per_token": self.engine.cache.bytes_per_token(), "outputs": [x.output_ids for x in r],
                "compile_s": self.engine.forwards.compile_seconds}


class TransformersRun:
    """transformers' AutoModelForCausalLM.generate (greedy, use_cache=True) on the same checkpoint and prompts."""

    def __init__(self, model, prompts, new_tokens: int):
        self.model, self.ids, self.new_tokens, self.out = model, torch.tensor(prompts, device=model.device), new_tokens, None

    def __call__(self) -> None:
        with torch.inference_mode():
            self.out = self.model.generate(self.ids, attention_mask=torch.ones_like(self.ids), do_sample=False,
                                           use_cache=True, max_new_tokens=self.new_tokens,
                                           min_new_tokens=self.new_tokens, pad_token_id=0,
                                           return_dict_in_generate=True)

    def stats(self) -> dict:
        cache = self.out.past_key_values
        tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)]
        cached_tokens = self.ids.shape[0] * tensors[0].shape[-2]
        return {"tokens_per_forward": 1.0, "acceptance": None, "compile_s": 0.0,
                "cache_bytes_per_token": sum(t.numel() * t.element_size() for t in tensors) // cached_tokens,
                "outputs": self.out.sequences[:, self.ids.shape[1]:].tolist()}


def load_transformers(model_dir: Path, dtype: torch.dtype):
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=None, metavar="DIR",
                   help="a model directory (default: a random model of --preset, saved to a temporary directory)")
    p.add_argument("--preset", default="small", help="preset of the random model (default small)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights and cache (default fp32)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="batch sizes (default 1 8)")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per sequence (default 32)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per sequence (default 64)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds, after one warmup (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline")
    p.add_argument("--compile", choices=["both", "on", "off"], default="both",
                   help="seekmoe engines eager ('off'), compiled ('on') or both (default)")
    p.add_argument("--out", type=Path, default=RESULTS / "decode.json", help="where the JSON results go")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or Path(tmp)
        if args.model is None:
            torch.manual_seed(0)
            seekmoe.build_model(ModelConfig.preset(args.preset)).save_pretrained(model_dir)
        model = seekmoe.from_pretrained(model_dir, dtype=dtype).eval()
        hf_model = None if args.no_transformers else load_transformers(model_dir, dtype)
        c = model.config
        print(header("seekmoe decode benchmark"))
        print(f"model {args.model or 'random ' + args.preset} ({args.dtype}): {c.num_hidden_layers} layers, hidden "
              f"{c.hidden_size}, {c.n_routed_experts} routed experts (top-{c.num_experts_per_tok}), kv_lora_rank "
              f"{c.kv_lora_rank}, qk_rope_head_dim {c.qk_rope_head_dim}, {c.num_nextn_predict_layers} MTP module(s); "
              f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens a sequence, greedy, median of "
              f"{args.repeats}\n")
        results = []
        for batch in args.batch_sizes:
            prompts = make_prompts(model_dir, c, batch, args.prompt_len)
            runs = {}
            if hf_model is not None:
                runs["transformers generate"] = TransformersRun(hf_model, prompts, args.new_tokens)
            for compiled in {"both": (False, True), "on": (True,), "off": (False,)}[args.compile]:
                name = "seekmoe compiled" if compiled else "seekmoe"
                runs[name] = SeekmoeRun(model, prompts, args.new_tokens, None, compiled)
                for drafts in range(1, c.num_nextn_predict_layers + 1):
                    runs[f"{name} + MTP {drafts} draft{'s' if drafts > 1 else ''}"] = SeekmoeRun(
                        model, prompts, args.new_tokens, "mtp", compiled, drafts)
            seconds = median_times(runs, args.repeats)
            baseline = "seekmoe" if "seekmoe" in runs else "seekmoe compiled"
            plain = runs[baseline].stats()["outputs"]
            for name, run in runs.items():
                stats = run.stats()
                same = stats.pop("outputs") == plain
                results.append({"engine": name, "batch": batch, "seconds": seconds[name],
                                "tokens_per_s": batch * args.new_tokens / seconds[name], "same_tokens": same, **stats})
    rate = {(r["engine"], r["batch"]): r["tokens_per_s"] for r in results}
    rows = [["engine", "batch", "tokens/s", "vs transformers", f"vs {baseline}", "tokens/forward", "MTP acceptance",
             "compile s", "cache bytes/token", "same tokens"]]
    for r in results:
        hf = rate.get(("transformers generate", r["batch"]))
        rows.append([r["engine"], str(r["batch"]), f"{r['tokens_per_s']:.1f}",
                     f"{r['tokens_per_s'] / hf:.2f}x" if hf else "-",
                     f"{r['tokens_per_s'] / rate[(baseline, r['batch'])]:.2f}x", f"{r['tokens_per_forward']:.2f}",
                     f"{r['acceptance']:.1%}" if r["acceptance"] is not None else "-",
                     f"{r['compile_s']:.1f}" if r["compile_s"] else "-",
                     str(r["cache_bytes_per_token"]), "yes" if r["same_tokens"] else "no"])
    print(table(rows))
    print("\ncompile s: seconds the warmup round spent compiling graphs (once per process and shape class; the "
          "timed rounds reuse them). tokens/s include prefill, which runs eagerly.")
    size = torch.tensor([], dtype=dtype).element_size()
    print(f"\n(kv_lora_rank + qk_rope_head_dim) x layers x dtype size = ({c.kv_lora_rank} + {c.qk_rope_head_dim}) x "
          f"{c.num_hidden_layers} x {size} = {(c.kv_lora_rank + c.qk_rope_head_dim) * c.num_hidden_layers * size} bytes")
    write_json(args.out, {"model": str(args.model or f"random {args.preset}"), "dtype": args.dtype,
                          "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
