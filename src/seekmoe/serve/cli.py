"""`seekmoe serve`: the OpenAI-compatible HTTP server for a model directory."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from ..inference.cli import add_model_arguments, load_engine
from .server import make_server

API_KEY_ENV = "SEEKMOE_API_KEY"


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0 picks a free one)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help=f"require 'Authorization: Bearer KEY' on /v1/ requests (default: ${API_KEY_ENV} if set, "
                        "else no key; the variable keeps the key out of the process list)")
    p.add_argument("--model-name", default=None, metavar="NAME",
                   help="the model id clients send and /v1/models lists (default: the directory's name)")
    p.add_argument("--max-batch-size", type=int, default=8, metavar="B",
                   help="requests decoded together (cache slots; default 8)")
    p.add_argument("--max-queue", type=int, default=64, metavar="Q",
                   help="requests that may wait for a slot before the server answers 503 (default 64)")
    p.add_argument("--max-prefill-tokens", type=int, default=64, metavar="T",
                   help="prompt tokens prefilled per engine step, so long prompts do not stall running streams "
                        "(default 64: on 2 CPU cores, smaller chunks keep running streams' inter-token latency "
                        "lower while long prompts arrive; see benchmarks/serve.py)")
    p.add_argument("--max-connections", type=int, default=256, metavar="C",
                   help="open connections kept (past C, the oldest without a request in progress is closed) and "
                        "requests handled at once (past C, 503; /health and /metrics are always answered) "
                        "(default 256)")
    p.add_argument("--timeout-keep-alive", type=int, default=5, metavar="S",
                   help="seconds an idle keep-alive connection, or a new one that has sent nothing, stays open "
                        "(default 5)")
    p.add_argument("--graceful-shutdown", type=int, default=30, metavar="S",
                   help="on SIGTERM or Ctrl-C, seconds in-flight requests get to finish (default 30)")
    p.add_argument("--allowed-image-dir", default=None, metavar="DIR",
                   help="a vision-language model's chat image parts may name file:///... URLs inside DIR (default: "
                        "refused; data: URLs are always accepted, http(s) URLs never fetched)")


def run_serve(args: argparse.Namespace) -> int:
    for flag in ("max_batch_size", "max_queue", "max_prefill_tokens", "max_connections", "timeout_keep_alive",
                 "graceful_shutdown"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')}={getattr(args, flag)}: expected at least 1")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port={args.port}: expected 0 to 65535")
    engine = load_engine(args, max_batch_size=args.max_batch_size, long_running=True)
    engine.max_prefill_tokens = args.max_prefill_tokens
    if engine.forwards.compiled:
        print("compiling the decode step (--compile off skips this)...", file=sys.stderr, flush=True)
        print(f"compiled in {engine.warm_up():.1f}s", file=sys.stderr, flush=True)
    name = args.model_name or Path(args.model).resolve().name
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if args.allowed_image_dir is not None and not Path(args.allowed_image_dir).is_dir():
        raise ValueError(f"--allowed-image-dir {args.allowed_image_dir}: no such directory")
    server = make_server(engine, name, args.host, args.port, api_key, args.max_queue,
                         allowed_image_dir=args.allowed_image_dir,
                         max_connections=args.max_connections, timeout_keep_alive=args.timeout_keep_alive,
                         graceful_shutdown_s=args.graceful_shutdown)
    print(f"serving {name!r} at {server.url}/v1 (Ctrl-C or SIGTERM stops, draining requests for up to "
          f"{args.graceful_shutdown} s)", file=sys.stderr, flush=True)
    # uvicorn drains on SIGTERM, then re-raises the signal to the previous handler: make that one a no-op so that
    # a drained shutdown exits 0 instead of dying by the signal.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
