"""Decode speed and cache size against context length for the DeepSeek families: V3 (MLA), V3.2 (MLA + lightning
indexer, sparse attention over its top-k) and V4 (sliding window, compressed sparse and heavily compressed layers),
seekmoe against transformers on the same weights (saved by seekmoe, loaded by transformers).

The three shapes share hidden size, layer count, heads and experts (--hidden, --layers), so only the attention
differs; V3.2's top-k (2048) and V4's window (128), rates (4 and 128) and top-k (512) are the releases'. For each
context length a prompt of that many random tokens is prefilled and --new-tokens are decoded greedily at batch 1.
decode tokens/s = (new_tokens - 1) / (time(prefill + new_tokens) - time(prefill + 1 token)): prefill cancels out.
Cache bytes per token: seekmoe's engine cache (inference/cache.py, bytes_per_token); for V4 also seekmoe's eager
decoding on the compact cache (model/v4_cache.py: window + compressed keys, measured, beside what `seekmoe info`
computes for that context); transformers' past_key_values bytes over the tokens it holds. A cell that fails (a path
a build lacks, memory) says so and the run goes on.

    python benchmarks/family_decode.py                                  # 1K 4K 16K 32K, fp32
    python benchmarks/family_decode.py --contexts 256 1024 --new-tokens 8 --repeats 1   # a quick look
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, header, table, write_json  # noqa: E402

import seekmoe  # noqa: E402
from seekmoe import ModelConfig  # noqa: E402
from seekmoe.inference import Engine, SamplingParams  # noqa: E402
from seekmoe.info import v4_cache_bytes  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FAMILIES = ("v3", "v32", "v4")


def family_config(family: str, hidden: int, layers: int, max_len: int) -> ModelConfig:
    """The family's shape at `hidden` x `layers`: tiny's experts and heads, the releases' attention settings."""
    common = dict(hidden_size=hidden, num_hidden_layers=layers, max_position_embeddings=max_len, vocab_size=4096,
                  num_nextn_predict_layers=0, rope_scaling=None)
    if family == "v3":
        return ModelConfig.preset("tiny", **common)
    if family == "v32":
        return ModelConfig.preset("tiny-v32", **common, index_topk=2048, index_n_heads=4, index_head_dim=32)
    kinds = ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"]
    return ModelConfig.preset("tiny-v4", **common, sliding_window=128, index_topk=512,
                              compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 128},
                              layer_types=[kinds[i % 3] for i in range(layers)],
                              mlp_layer_types=["hash_moe"] + ["moe"] * (layers - 1))


class Seekmoe:
    """seekmoe's engine on one prompt; `run(n)` prefills and decodes n tokens."""

    def __init__(self, model, prompt: list[int], new_tokens: int):
        self.prompt = prompt
        self.engine = Engine(model, max_batch_size=1, max_seq_len=len(prompt) + new_tokens + 1, compile=False)
        self.outputs: list[int] = []

    def run(self, n: int) -> list[float]:
        """Prefill and decode n tokens; the time each token came out."""
        times, request = [], None
        for event in self.engine.stream(self.prompt, SamplingParams(max_new_tokens=n, temperature=0,
                                                                    ignore_eos=True)):
            request = event.request
            times += [time.perf_counter()] * (len(request.output_ids) - len(times))
        self.outputs = request.output_ids
        return times

    def cache_bytes_per_token(self) -> float:
        return self.engine.cache.bytes_per_token()


class V4Compact:
    """seekmoe's eager V4 decoding on its compact per-layer caches (model/v4_cache.py: the window and compressed
    keys, what `seekmoe info` counts); the prompt prefilled in chunks of PREFILL_CHUNK tokens."""

    PREFILL_CHUNK = 1024

    def __init__(self, model, prompt: list[int], new_tokens: int):
        self.model, self.prompt = model, torch.tensor([prompt])
        self.outputs: list[int] = []
        self.caches = []

    @torch.inference_mode()
    def run(self, n: int) -> list[float]:
        from seekmoe.model.v4_cache import V4LayerCache

        self.caches = [V4LayerCache(self.model.config.sliding_window) for _ in self.model.model.layers]
        S = self.prompt.shape[1]
        for start in range(0, S, self.PREFILL_CHUNK):
            chunk = self.prompt[:, start:start + self.PREFILL_CHUNK]
            logits = self.model(chunk, position_ids=torch.arange(start, start + chunk.shape[1]),
                                cache=self.caches).logits
        tokens = [logits[:, -1].argmax(-1)]
        times = [time.perf_counter()]
        for t in range(S, S + n - 1):
            logits = self.model(tokens[-1][:, None], position_ids=torch.tensor([t]), cache=self.caches).logits
            tokens.append(logits[:, -1].argmax(-1))
            times.append(time.perf_counter())
        self.outputs = torch.cat(tokens).tolist()
        return times

    def cache_bytes_per_token(self) -> float:
        """The storage the caches keep alive over the tokens they hold (the last output is never fed back)."""
        return sum(c.nbytes() for c in self.caches) / self.caches[0].seen


class Transformers:
    """transformers' generate (greedy, its own cache) on the same prompt."""

    def __init__(self, model, prompt: list[int], new_tokens: int):
        self.model, self.ids = model, torch.tensor([prompt])
        self.outputs: list[int] = []
        self.cache = None

    def run(self, n: int) -> list[float]:
        times: list[float] = []

        class Clock:  # a streamer: generate hands it the prompt once, then every new token as it comes out
            def put(self, value):
                times.append(time.perf_counter())

            def end(self):
                pass

        with torch.inference_mode():
            out = self.model.generate(self.ids, attention_mask=torch.ones_like(self.ids), do_sample=False,
                                      use_cache=True, max_new_tokens=n, min_new_tokens=n, pad_token_id=0,
                                      return_dict_in_generate=True, streamer=Clock())
        self.outputs, self.cache = out.sequences[0, self.ids.shape[1]:].tolist(), out.past_key_values
        return times[1:]  # the first put is the prompt

    def cache_bytes_per_token(self) -> float:
        """Every storage the cache's layers keep alive, each once (whatever their names: V4's layers keep the
        compressed keys, the indexer's keys, open windows and overlaps in dicts beside keys/values), over the tokens
        it holds (the last output is never fed back)."""
        storages = {}
        for layer in getattr(self.cache, "layers", []):
            for value in vars(layer).values():
                values = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) \
                    else [value]
                for t in values:
                    if isinstance(t, torch.Tensor):
                        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return sum(storages.values()) / (self.ids.shape[1] + len(self.outputs) - 1)


def decode_rate(engine, new_tokens: int, repeats: int) -> float:
    """Decode tokens/s, the best of `repeats` runs: the tokens after the first over the time from the first token
    (the prefill's) to the last. Timed token by token: subtracting a 1-token run's time from an N-token run's, as
    this did before, let the prefill's run-to-run spread swamp the decode time at long contexts."""
    best = 0.0
    for _ in range(repeats):
        times = engine.run(new_tokens)
        if len(times) != new_tokens:
            raise RuntimeError(f"{len(times)} token times for {new_tokens} tokens")
        best = max(best, (new_tokens - 1) / max(times[-1] - times[0], 1e-9))
    return best


def measure(name: str, make, new_tokens: int, repeats: int) -> dict:
    try:
        engine = make()
        rate = decode_rate(engine, new_tokens, repeats)
        return {"engine": name, "decode_tokens_per_s": rate, "cache_bytes_per_token": engine.cache_bytes_per_token(),
                "outputs": engine.outputs}
    except Exception as e:  # noqa: BLE001 - a failing cell is reported, the others still run
        return {"engine": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 32768],
                   help="prompt lengths in tokens (default 1024 4096 16384 32768)")
    p.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES), help="default: all three")
    p.add_argument("--hidden", type=int, default=256, help="hidden size of every shape (default 256)")
    p.add_argument("--layers", type=int, default=4, help="layers of every shape (default 4)")
    p.add_argument("--new-tokens", type=int, default=32, help="decoded tokens a measurement (default 32)")
    p.add_argument("--repeats", type=int, default=2, help="timings of each run, the best kept (default 2)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights and caches (default fp32)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-transformers", action="store_true", help="seekmoe only")
    p.add_argument("--out", type=Path, default=RESULTS / "family_decode.json", help="where the JSON goes")
    args = p.parse_args(argv)
    if min(args.contexts) < 1 or args.new_tokens < 2:
        p.error(f"--contexts {args.contexts} / --new-tokens {args.new_tokens}: expected contexts >= 1, new tokens >= 2")
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    dtype, size = DTYPES[args.dtype], torch.tensor([], dtype=DTYPES[args.dtype]).element_size()
    max_len = max(args.contexts) + args.new_tokens + 8
    print(header("seekmoe family decode benchmark (batch 1, greedy)"))
    print(f"precision {args.dtype}; hidden {args.hidden}, {args.layers} layers; {args.new_tokens} new tokens, best "
          f"of {args.repeats}; contexts {args.contexts}\n")
    results = []
    for family in args.families:
        config = family_config(family, args.hidden, args.layers, max_len)
        with tempfile.TemporaryDirectory() as tmp:
            torch.manual_seed(0)
            seekmoe.build_model(config).save_pretrained(tmp)
            ours = seekmoe.from_pretrained(tmp, dtype=dtype).eval()
            theirs = None if args.no_transformers else transformers.AutoModelForCausalLM.from_pretrained(
                tmp, dtype=dtype).eval()
            for context in args.contexts:
                prompt = torch.randint(2, config.vocab_size, (context,),
                                       generator=torch.Generator().manual_seed(context)).tolist()
                cells = [measure("seekmoe", lambda: Seekmoe(ours, prompt, args.new_tokens), args.new_tokens,
                                 args.repeats)]
                if config.is_v4:
                    cells.append(measure("seekmoe V4 compact cache", lambda: V4Compact(ours, prompt, args.new_tokens),
                                         args.new_tokens, args.repeats))
                if theirs is not None:
                    cells.append(measure("transformers", lambda: Transformers(theirs, prompt, args.new_tokens),
                                         args.new_tokens, args.repeats))
                held = context + args.new_tokens - 1  # the tokens the caches hold: the last output is not fed back
                compact = v4_cache_bytes(config, held, size) / held if config.is_v4 else None
                reference = next((c["outputs"] for c in cells if "outputs" in c), None)  # seekmoe's first
                for cell in cells:
                    outputs = cell.pop("outputs", None)
                    cell["same_tokens"] = None if outputs is None or reference is None else outputs == reference
                    results.append({"family": family, "context": context, **cell,
                                    "v4_compact_cache_bytes_per_token": compact})
                    print(f"{family} {context}: {cell}", flush=True)
    rows = [["family", "context", "engine", "decode tokens/s", "cache bytes/token", "V4 compact bytes/token",
             "same tokens as 1st seekmoe row"]]
    for r in results:
        rows.append([r["family"], str(r["context"]), r["engine"],
                     f"{r['decode_tokens_per_s']:.1f}" if "error" not in r else r["error"],
                     f"{r['cache_bytes_per_token']:.0f}" if "error" not in r else "-",
                     f"{r['v4_compact_cache_bytes_per_token']:.0f}" if r["v4_compact_cache_bytes_per_token"] else "-",
                     {None: "-", True: "yes", False: "no"}[r["same_tokens"]]])
    print()
    print(table(rows))
    write_json(args.out, {"dtype": args.dtype, "hidden": args.hidden, "layers": args.layers,
                          "new_tokens": args.new_tokens, "repeats": args.repeats, "contexts": args.contexts,
                          "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
