"""`seekmoe chat`: an interactive conversation with a model, through the chat template."""

from __future__ import annotations

import argparse
import sys

from .chat_template import CHAT_STOP, format_chat
from .cli import add_model_arguments, add_sampling_arguments, load_engine, sampling_params


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    add_sampling_arguments(p, temperature=0.7)
    p.add_argument("--system", metavar="TEXT", default=None, help="a system message that opens the conversation")


def run(args: argparse.Namespace) -> int:
    engine = load_engine(args, max_batch_size=1)
    params = sampling_params(args, stop=CHAT_STOP)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    if interactive:
        print("Type a message; an empty line, /exit or Ctrl-D ends the chat.", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("", "/exit"):
            return 0
        messages.append({"role": "user", "content": line.strip()})
        ids = engine.tokenizer.encode(format_chat(messages))
        try:
            engine.check_prompt(ids)
        except ValueError as e:
            print(f"the conversation no longer fits: {e}", file=sys.stderr)
            return 1
        reply = ""
        for event in engine.stream(ids, params):
            text = event.text if reply else event.text.lstrip()  # no space after "Assistant:"
            reply += text
            sys.stdout.write(text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": reply.strip()})
