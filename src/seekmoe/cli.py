"""The `seekmoe` command. Each subcommand lives with the code it drives and exposes
`add_arguments(parser)` and `run(args) -> int`; this file only dispatches."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Modules are imported only when their command runs.
COMMANDS = {
    "info": ("seekmoe.info_cli", "parameters, FLOPs and KV-cache size of a preset or a model directory"),
    "train": ("seekmoe.train.cli", "pretrain a model on text (the default corpus: Python's standard library)"),
    "generate": ("seekmoe.inference.cli", "complete a prompt with a trained model"),
    "chat": ("seekmoe.inference.chat", "talk to a model interactively"),
    "serve": ("seekmoe.serve.cli", "serve a model over an OpenAI-compatible HTTP API"),
    "analyze": ("seekmoe.analysis.cli", "routing statistics of a model on a text"),
}


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run one subcommand; returns the process exit status."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="seekmoe", description="DeepSeek-style Mixture-of-Experts language models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    available = {}
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and module_name.startswith(e.name):
                continue  # a command whose module this version does not have
            raise
        available[name] = module
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return available[args.command].run(args) or 0
    except (ValueError, FileNotFoundError) as e:
        print(f"seekmoe {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
