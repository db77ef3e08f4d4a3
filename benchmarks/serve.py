"""Serving latency and throughput: requests/s, time to first token (TTFT) and inter-token latency (ITL, p50/p99)
of streamed completions at 1, 8 and 32 concurrent clients, and the ITL of running streams while long prompts
arrive (chunked prefill should keep its p99 within a few times the quiet one).

The server runs as `seekmoe serve` in a subprocess, from this tree or from another source tree (--src), so the
same script measures an older server for comparison; clients are threads speaking plain HTTP to 127.0.0.1.

    python benchmarks/serve.py                               # a random `small` model with a fresh tokenizer
    python benchmarks/serve.py --src /tmp/old/src --label old   # the same against another checkout's server
"""

from __future__ import annotations

import argparse
import http.client
import inspect
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, header, table, write_json  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
REQUEST_TIMEOUT_S = 120  # a server whose decode loop has died never answers: count such requests as errors


def make_model_dir(path: Path, preset: str, max_len: int) -> Path:
    """A random model of `preset` and a byte-level BPE tokenizer trained on some of the standard library."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    import seekmoe
    from seekmoe import ModelConfig

    torch.manual_seed(0)
    model = seekmoe.build_model(ModelConfig.preset(preset, max_position_embeddings=max_len))
    model.save_pretrained(path)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=model.config.vocab_size,
                                  special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([inspect.getsource(argparse), inspect.getsource(json)], trainer)
    tok.save(str(path / "tokenizer.json"))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, src: Path, port: int, extra: list[str], timeout_s: float = 600) -> subprocess.Popen:
    # The source tree first; what the caller's path held (packages installed outside site-packages) after it.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(src), os.environ.get("PYTHONPATH")) if p))
    launch = "import sys; from seekmoe.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", launch, "serve", "--model", str(model), "--port", str(port),
                             "--model-name", "m", *extra], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout_s  # `seekmoe serve` compiles its decode step before it listens (--compile auto)
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"the server did not start: {proc.stderr.read()[-2000:]}")


def stream_one(port: int, prompt: str, max_tokens: int) -> tuple[float, list[float], float]:
    """(TTFT, gaps between later text events, total seconds) of one streamed completion."""
    body = json.dumps({"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True})
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"status {response.status}: {response.read()[:300]!r}")
    times = []
    for line in response:  # http.client undoes chunked framing when iterating lines
        if line.startswith(b"data: {"):
            choices = json.loads(line[6:])["choices"]
            if choices and choices[0]["text"]:
                times.append(time.perf_counter())
        elif line.startswith(b"data: [DONE]"):
            break
    conn.close()
    end = time.perf_counter()
    if not times:
        return end - start, [], end - start
    return times[0] - start, [b - a for a, b in zip(times, times[1:])], end - start


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def load(port: int, clients: int, requests_each: int, prompt: str, max_tokens: int) -> dict:
    ttft, itl, errors = [], [], []

    def client() -> None:
        for _ in range(requests_each):
            try:
                first, gaps, _ = stream_one(port, prompt, max_tokens)
                ttft.append(first)
                itl.extend(gaps)
            except Exception as e:  # noqa: BLE001 - counted
                errors.append(repr(e))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"clients": clients, "requests": len(ttft), "errors": len(errors), "requests_per_s": len(ttft) / wall,
            "ttft_p50_ms": 1e3 * pct(ttft, 0.5), "ttft_p99_ms": 1e3 * pct(ttft, 0.99),
            "itl_p50_ms": 1e3 * pct(itl, 0.5), "itl_p99_ms": 1e3 * pct(itl, 0.99)}


def interference(port: int, streams: int, long_prompt: str, seconds: float) -> dict:
    """p99 ITL of `streams` running streams, quiet and then while clients keep sending long prompts."""
    out = {}
    for label, long_clients in (("quiet", 0), ("long_prompts", 2)):
        stop = threading.Event()

        def long_client() -> None:
            while not stop.is_set():
                stream_one(port, long_prompt, 1)

        loaders = [threading.Thread(target=long_client) for _ in range(long_clients)]
        for t in loaders:
            t.start()
        time.sleep(0.5 if long_clients else 0)
        gaps, deadline = [], time.monotonic() + seconds

        def streamer() -> None:
            while time.monotonic() < deadline:
                gaps.extend(stream_one(port, "def main(", 64)[1])

        threads = [threading.Thread(target=streamer) for _ in range(streams)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stop.set()
        for t in loaders:
            t.join()
        out[label] = {"itl_p50_ms": 1e3 * pct(gaps, 0.5), "itl_p99_ms": 1e3 * pct(gaps, 0.99)}
    out["p99_ratio"] = out["long_prompts"]["itl_p99_ms"] / out["quiet"]["itl_p99_ms"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=None, help="a model directory (default: a random --preset model)")
    p.add_argument("--preset", default="small")
    p.add_argument("--src", type=Path, default=REPO / "src", help="the source tree whose server to run")
    p.add_argument("--label", default="this tree")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--long-prompt-tokens", type=int, default=1500)
    p.add_argument("--seconds", type=float, default=10.0, help="length of each interference phase")
    p.add_argument("--server-args", default="", help="extra `seekmoe serve` flags, space-separated")
    p.add_argument("--out", type=Path, default=RESULTS / "serve.json")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or make_model_dir(Path(tmp), args.preset, 2048)
        port = free_port()
        proc = start_server(model, args.src, port, args.server_args.split())
        try:
            print(header(f"seekmoe serve ({args.label}), {model if args.model else 'random ' + args.preset} model"))
            stream_one(port, "warm up", 4)
            rows = [["clients", "requests/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms", "errors"]]
            results = []
            for c in args.clients:
                r = load(port, c, max(2, 16 // c), "def main(argv):\n", args.max_tokens)
                results.append(r)
                rows.append([str(c), f"{r['requests_per_s']:.2f}", f"{r['ttft_p50_ms']:.0f}", f"{r['ttft_p99_ms']:.0f}",
                             f"{r['itl_p50_ms']:.1f}", f"{r['itl_p99_ms']:.1f}", str(r["errors"])])
            print(table(rows))
            long_prompt = "x = 1\n" * (args.long_prompt_tokens // 4)
            inter = interference(port, 4, long_prompt, args.seconds)
            print(f"4 streams' ITL p99: {inter['quiet']['itl_p99_ms']:.1f} ms quiet, "
                  f"{inter['long_prompts']['itl_p99_ms']:.1f} ms while ~{args.long_prompt_tokens}-token prompts "
                  f"arrive ({inter['p99_ratio']:.2f}x)")
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    write_json(args.out, {"label": args.label, "preset": args.preset, "max_tokens": args.max_tokens,
                          "load": results, "interference": inter})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
