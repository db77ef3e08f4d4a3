"""The `seekmoe` command. Each command NAME lives in the `cli` module of the package whose code it drives
(`<package>/cli.py`, several commands to a module where a package has several) as `add_NAME_arguments(parser)` and
`run_NAME(args) -> int`; this file only dispatches, importing just the chosen command's module (so `seekmoe info`
never pays for, or depends on, the server's imports)."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS = {
    "info": ("seekmoe.info.cli", "parameters, FLOPs and KV-cache size of a preset or a model directory"),
    "train": ("seekmoe.train.cli", "pretrain a model on text (the default corpus: Python's standard library)"),
    "export": ("seekmoe.train.cli", "turn a training checkpoint into a Hugging Face model folder, or a model into GGUF"),
    "generate": ("seekmoe.inference.cli", "complete a prompt with a trained model"),
    "chat": ("seekmoe.inference.cli", "talk to a model interactively"),
    "serve": ("seekmoe.serve.cli", "serve a model over an OpenAI-compatible HTTP API"),
    "analyze": ("seekmoe.analysis.cli", "routing analysis of a trained model on held-out text, as an HTML report"),
    "sft": ("seekmoe.posttrain.cli", "fine-tune a model on chats or prompt/completion pairs (assistant tokens only)"),
    "rl": ("seekmoe.posttrain.cli", "improve a model on a task with verifiable rewards by GRPO (routing replay on)"),
    "expand": ("seekmoe.grow.cli", "add routed experts to a trained model (to learn a new domain in them)"),
    "upcycle": ("seekmoe.grow.cli", "turn a dense model into a DeepSeekMoE that starts where it stood"),
    "merge": ("seekmoe.lora.cli", "merge a LoRA adapter (PEFT format) into a copy of its base model folder"),
    "quantize": ("seekmoe.quant.cli", "write an int8/int4 weight-only copy of a model folder, for CPU decoding"),
}


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run one subcommand; returns the process exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="seekmoe", description="DeepSeek-style Mixture-of-Experts language models. "
                                     "Run `seekmoe COMMAND --help` for a command's options.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parsers = {name: sub.add_parser(name, help=text, description=text) for name, (_, text) in COMMANDS.items()}
    module = None
    if argv and argv[0] in COMMANDS:
        module = importlib.import_module(COMMANDS[argv[0]][0])
        getattr(module, f"add_{argv[0]}_arguments")(parsers[argv[0]])
    args = parser.parse_args(argv)
    if module is None:
        parser.print_help()
        return 2
    try:
        return getattr(module, f"run_{args.command}")(args) or 0
    except (ValueError, FileNotFoundError) as e:
        print(f"seekmoe {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
