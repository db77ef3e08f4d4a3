"""`seekmoe serve`: the OpenAI-compatible HTTP server for a model directory."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..inference.cli import add_model_arguments, load_engine
from .server import make_server


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0 picks a free one)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1/ requests (default: no key)")
    p.add_argument("--model-name", default=None, metavar="NAME",
                   help="the model id clients send and /v1/models lists (default: the directory's name)")
    p.add_argument("--max-batch-size", type=int, default=8, metavar="B",
                   help="requests decoded together (cache slots; default 8)")
    p.add_argument("--max-queue", type=int, default=64, metavar="Q",
                   help="requests that may wait for a slot before the server answers 503 (default 64)")


def run(args: argparse.Namespace) -> int:
    for flag in ("max_batch_size", "max_queue"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')}={getattr(args, flag)}: expected at least 1")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port={args.port}: expected 0 to 65535")
    engine = load_engine(args, max_batch_size=args.max_batch_size)
    name = args.model_name or Path(args.model).resolve().name
    server = make_server(engine, name, args.host, args.port, args.api_key, args.max_queue)
    print(f"serving {name!r} at {server.url}/v1 (Ctrl-C stops)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
