"""`seekmoe generate` (complete prompts with a trained model) and `seekmoe chat` (an interactive conversation through
the chat template)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from .chat_template import CHAT_STOP, format_chat
from ..quant.cli import add_quantize_flags, quant_spec
from .compiled import COMPILE_CHOICES, should_compile
from .engine import SPECULATIVE_METHODS, Engine, Request
from .sampling import SamplingParams
from .tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Flags that pick the model and how it runs (shared by generate, chat and serve)."""
    p.add_argument("--model", metavar="DIR", required=True,
                   help="a model directory: config.json, safetensors weights and tokenizer.json")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="weight and cache type (default float32; with --mmap the checkpoint's own)")
    p.add_argument("--mmap", action="store_true",
                   help="leave the weights in their safetensors files, paged in when used (experts only when routed "
                        "to): for models larger than memory, CPU only. Automatic when the weights do not fit")
    p.add_argument("--device", default="cpu", help="torch device to run on (default cpu)")
    p.add_argument("--max-seq-len", type=int, default=None, metavar="N",
                   help="context length: prompt plus completion, in tokens; the cache is preallocated for it "
                        "(default: the model's maximum, at most 4096)")
    p.add_argument("--speculative", choices=SPECULATIVE_METHODS, default=None,
                   help="speculative decoding: 'mtp' drafts with the model's MTP modules (default off)")
    p.add_argument("--num-speculative-tokens", type=int, default=None, metavar="N",
                   help="with --speculative mtp: tokens drafted per step, 1 to the number of MTP modules; the "
                        "first module drafts the first, each further module drafts one more (default: all modules)")
    p.add_argument("--compile", choices=COMPILE_CHOICES, default="auto",
                   help="torch.compile the decode step (prefill stays eager): same tokens, several times fewer "
                        "operator launches; compiling takes seconds to a minute once. 'auto' (default) compiles "
                        "on CUDA and in the server, not for a one-off CPU generation")
    add_quantize_flags(p)


def add_sampling_arguments(p: argparse.ArgumentParser, temperature: float) -> None:
    """Flags that set SamplingParams."""
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="tokens to generate at most (default 128)")
    p.add_argument("--temperature", type=float, default=temperature, metavar="T",
                   help=f"softmax temperature; 0 is greedy (default {temperature})")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (default 1: off)")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="sample among the K likeliest (default 0: off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R",
                   help="divide positive logits of tokens already seen by R (default 1: off)")
    p.add_argument("--seed", type=int, default=None, metavar="S", help="random seed for sampling (default: random)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end the completion before TEXT (repeatable)")


def load_engine(args: argparse.Namespace, max_batch_size: int, long_running: bool = False) -> Engine:
    """The engine for the model flags; `long_running` (the server) lets --compile auto compile on a CPU too."""
    if not Path(args.model).is_dir():
        raise FileNotFoundError(f"--model {args.model}: no such directory")
    if args.num_speculative_tokens is not None and args.speculative is None:
        raise ValueError(f"--num-speculative-tokens={args.num_speculative_tokens}: expected --speculative mtp too")
    compile = should_compile(args.compile, torch.device(args.device), long_running)
    model = load_model(args, compile)
    tokenizer = Tokenizer(args.model, model.config.bos_token_id, model.config.eos_token_id)
    return Engine(model, tokenizer, max_batch_size=max_batch_size, max_seq_len=args.max_seq_len,
                  speculative=args.speculative, num_speculative_tokens=args.num_speculative_tokens, compile=compile)


def load_model(args: argparse.Namespace, compile: bool):
    """The model of --model in --dtype on --device: quantized on load with --quantize, or as `seekmoe quantize`
    wrote it; quantized modules multiply the way compiled or eager decoding wants (`configure_quantized`)."""
    from .. import from_pretrained
    from ..quant import configure_quantized, quantize_model
    from ..quant.folder import is_quantized_folder, load_quantized

    spec = quant_spec(args, args.quantize)
    if is_quantized_folder(args.model):
        if spec is not None:
            raise ValueError(f"--quantize {args.quantize}: {args.model} is quantized already (by seekmoe "
                             f"quantize): expected no --quantize")
        model = load_quantized(args.model, dtype=DTYPES[args.dtype] if args.dtype else torch.float32,
                               device=args.device)
    else:
        # --mmap leaves the weights in their files in their own dtype (a conversion would copy them all)
        dtype = DTYPES[args.dtype] if args.dtype else None if args.mmap else torch.float32
        model = from_pretrained(args.model, dtype=dtype, device=args.device, mmap=True if args.mmap else "auto")
        if spec is not None:
            quantize_model(model, spec, embeddings=args.quantize_embeddings)
    configure_quantized(model, compile)
    return model


def sampling_params(args: argparse.Namespace, stop: list[str] | None = None) -> SamplingParams:
    """SamplingParams from the sampling flags (ValueError names a flag's bad value)."""
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                          stop=list(args.stop) + list(stop or []), ignore_eos=getattr(args, "ignore_eos", False))


def report(requests: list[Request], seconds: float) -> str:
    """One line of decoding statistics: tokens/s, tokens per forward, and the MTP acceptance rate."""
    tokens = sum(len(r.output_ids) for r in requests)
    forwards = max((r.forwards for r in requests), default=0)
    line = f"{tokens} tokens in {seconds:.2f}s ({tokens / max(seconds, 1e-9):.1f} tokens/s), " \
           f"{tokens / max(forwards * len(requests), 1):.2f} tokens per forward"
    drafted = sum(r.drafted for r in requests)
    if drafted:
        line += f", MTP acceptance {sum(r.accepted for r in requests) / drafted:.1%} of {drafted} drafts"
    return line


def memory_report(model) -> str:
    """One line: peak and current resident memory, and for a mapped model how much of the weights stay in files."""
    from ..mapped_weights import memory_stats

    m, gib = memory_stats(), 2**30
    line = f"memory: peak RSS {m['peak_rss'] / gib:.2f} GiB, RSS now {m.get('rss', 0) / gib:.2f} GiB"
    if "rss_anon" in m:
        line += f" ({m['rss_anon'] / gib:.2f} private, {m['rss_file'] / gib:.2f} file pages)"
    mapping = getattr(model, "mapping", None)
    if mapping is not None:
        line += f"; weights mapped from files {mapping.mapped_bytes / gib:.2f} GiB, copied {mapping.copied_bytes / gib:.2f} GiB"
    return line


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--prompt", metavar="TEXT", help="the text to complete")
    which.add_argument("--prompts-file", metavar="F",
                       help="complete every line of F as its own prompt (batched); prints one JSON object a line: "
                            "{prompt, completion, finish_reason}")
    add_model_arguments(p)
    add_sampling_arguments(p, temperature=0.0)
    p.add_argument("--ignore-eos", action="store_true",
                   help="keep generating past the end-of-text token, so exactly --max-new-tokens come out (benchmarks)")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="prompts decoded together (default 8)")
    p.add_argument("--stats", action="store_true",
                   help="print tokens/s, the MTP acceptance rate, the compile time and memory (peak and current "
                        "resident set) to stderr")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image (PNG, JPEG or WebP) for a vision-language model, repeatable: each goes where the "
                        "prompt says <image>, or, without any <image>, before the prompt text")


def run_generate(args: argparse.Namespace) -> int:
    params = sampling_params(args)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size={args.batch_size}: expected at least 1")
    if args.prompts_file is not None:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"--prompts-file {path}: no such file")
        prompts = [line for line in path.read_text().splitlines() if line.strip()]
    else:
        prompts = [args.prompt]
    if args.image:
        return _generate_with_images(args, params)
    engine = load_engine(args, max_batch_size=min(args.batch_size, len(prompts)))
    ids = [engine.tokenizer.encode(p) for p in prompts]
    for x in ids:
        engine.check_prompt(x)
    start = time.perf_counter()
    if args.prompts_file is None:
        requests = []
        for event in engine.stream(ids[0], params):
            requests = [event.request]
            sys.stdout.write(event.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        requests = engine.generate(ids, params)
        for prompt, r in zip(prompts, requests):
            print(json.dumps({"prompt": prompt, "completion": r.text, "finish_reason": r.finish_reason}))
    if args.stats:
        print(report(requests, time.perf_counter() - start), file=sys.stderr)
        if engine.forwards.compiled:
            print(f"(including {engine.forwards.compile_seconds:.1f}s compiling the decode step)", file=sys.stderr)
        print(memory_report(engine.model), file=sys.stderr)
    failed = [r for r in requests if r.finish_reason == "error"]
    if failed:  # the engine ended them early (and logged the traceback): a script must not take this for success
        print(f"seekmoe generate: error: {len(failed)} of {len(requests)} requests failed after "
              f"{len(failed[0].output_ids)} tokens: {failed[0].error.splitlines()[0]}", file=sys.stderr)
        return 1
    return 0


def _generate_with_images(args: argparse.Namespace, params: SamplingParams) -> int:
    """`seekmoe generate --prompt TEXT --image PATH ...`: the images' placeholders in the prompt, then one stream."""
    from ..vision.images import load_image_file
    from ..vision.inference import IMAGE_TAG, image_prompt
    from ..vision.sft import IMAGE_MARK

    if args.prompt is None:
        raise ValueError("--image goes with --prompt (one prompt), not --prompts-file")
    images = [load_image_file(path) for path in args.image]  # ValueError naming the file and why
    text = args.prompt
    if IMAGE_TAG not in text:
        text = IMAGE_TAG * len(images) + text
    if IMAGE_MARK in text:
        raise ValueError("--prompt holds U+E000, which stands for images here: remove it")
    engine = load_engine(args, max_batch_size=1)
    if engine.vision is None:
        raise ValueError(f"--image: {args.model} is a text model (no vision tower); train one with "
                         f"`seekmoe sft --vision-tower`")
    ids, pixel_values, grid = image_prompt(text.replace(IMAGE_TAG, IMAGE_MARK), images, engine.tokenizer,
                                           engine.vision.config)
    engine.check_prompt(ids, images=True)  # image tokens count against the context
    start = time.perf_counter()
    request = engine.add(Request(ids, params, pixel_values=pixel_values, image_grid_thw=grid))
    while not request.done:
        for event in engine.step():
            sys.stdout.write(event.text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    if request.finish_reason == "error":
        raise RuntimeError(f"generation failed: {request.error}")
    if args.stats:
        print(report([request], time.perf_counter() - start), file=sys.stderr)
    return 0


def add_chat_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    add_sampling_arguments(p, temperature=0.7)
    p.add_argument("--system", metavar="TEXT", default=None, help="a system message that opens the conversation")


def run_chat(args: argparse.Namespace) -> int:
    engine = load_engine(args, max_batch_size=1)
    params = sampling_params(args, stop=CHAT_STOP)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    if interactive:
        print("Type a message; an empty line, /exit or Ctrl-D ends the chat."
              + (" /image PATH adds an image to your next message." if engine.vision is not None else ""),
              file=sys.stderr)
    images, pending = [], ""  # the conversation's images, and the marks of those the next message carries
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("", "/exit"):
            return 0
        if line.startswith("/image "):
            try:
                images.append(_chat_image(engine, line[len("/image "):].strip()))
                from ..vision.sft import IMAGE_MARK

                pending += IMAGE_MARK
            except ValueError as e:  # a bad file costs the image, not the conversation
                print(f"/image: {e}", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": pending + line.strip()})
        pending = ""
        if images:
            from ..vision.inference import image_prompt

            ids, pixel_values, grid = image_prompt(format_chat(messages), images, engine.tokenizer,
                                                   engine.vision.config)
        else:
            ids, pixel_values, grid = engine.tokenizer.encode(format_chat(messages)), None, None
        try:
            engine.check_prompt(ids, images=bool(images))
        except ValueError as e:
            print(f"the conversation no longer fits: {e}", file=sys.stderr)
            return 1
        reply = ""
        for event in engine.stream(ids, params, pixel_values=pixel_values, image_grid_thw=grid):
            text = event.text if reply else event.text.lstrip()  # no space after "Assistant:"
            reply += text
            sys.stdout.write(text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": reply.strip()})


def _chat_image(engine: Engine, path: str):
    """The image `/image PATH` names, for a vision-language model (ValueError saying why not)."""
    from ..vision.images import load_image_file

    if engine.vision is None:
        raise ValueError("this model takes no images (it has no vision tower)")
    return load_image_file(path)
