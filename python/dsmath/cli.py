"""The `dsmath` command: one entry point for generation, serving, training, evaluation and benchmarks.

    dsmath generate --model DIR "prompt"        one-off prompts through the engine
    dsmath serve --model DIR [--port 8000]       OpenAI-compatible HTTP server (needs the `serve` extra)
    dsmath train --config toy --out runs/toy     GRPO; multi-GPU: torchrun --nproc-per-node 8 -m dsmath.train.grpo
    dsmath eval --model DIR --data FILE          MATH-500 / GSM8K / AIME evaluation
    dsmath bench [--preset ...]                  the headline generation-throughput benchmark
    dsmath bench serve [--concurrency 32]        the serving benchmark (bench/serve.py)

`dsmath CMD --help` shows a command's own options. Each command is the `main(argv)` of a module of the
distribution; from a source checkout (no `dsmath/model` beside this file) the repo's top-level packages serve."""

from __future__ import annotations

import importlib
import os
import sys

# name -> (module under the distribution, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("model.engine.cli", "generate completions for prompts with the engine"),
    "serve": ("model.serve.cli", "OpenAI-compatible HTTP server (dsmath serve --model DIR)"),
    "train": ("train.grpo", "GRPO training (python -m train.grpo)"),
    "eval": ("train.eval", "evaluate a checkpoint on MATH-500, GSM8K, AIME, AMC"),
    "bench": ("bench.throughput", "generation-throughput benchmark (bench/throughput.py)"),
}
# `dsmath bench NAME ...`: the other benchmarks
BENCH_COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("bench.serve", "serving benchmark: concurrent streams vs in-process (bench/serve.py)"),
}

_INSTALLED = os.path.isdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), "model"))


def command_module(name: str, sub: str | None = None):
    """The module behind `dsmath NAME [SUB]`: dsmath.<module> when installed, <module> from a source checkout."""
    module = BENCH_COMMANDS[sub][0] if sub else COMMANDS[name][0]
    return importlib.import_module(f"dsmath.{module}" if _INSTALLED else module)


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: dsmath COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += [f"  bench {name}  {help_}" for name, (_, help_) in BENCH_COMMANDS.items()]
    lines += ["", "`dsmath COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__
        print(f"dsmath {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"dsmath: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    sub = rest[0] if name == "bench" and rest[:1] and rest[0] in BENCH_COMMANDS else None
    if sub:
        name, rest = f"bench {sub}", rest[1:]
    sys.argv[0] = f"dsmath {name}"  # argparse's prog in the command's usage line
    result = command_module(name.split()[0], sub).main(rest)
    return result if isinstance(result, int) else 0
