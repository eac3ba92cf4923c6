"""`sbtrain COMMAND ...`: dispatch to one thin front-end per command, with one error policy.

A `UserError` (bad input) prints one line and exits with status 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from sbtrain import __version__, allocator
from sbtrain.errors import UserError

COMMANDS = {
    "preprocess": ("cli.preprocess", "tokenize raw text and write binarized splits"),
    "train": ("cli.train", "train a model (rerunning the same command resumes)"),
    "eval-ppl": ("cli.eval_ppl", "perplexity (copy, classifiers: accuracy) of a checkpoint"),
    "generate": ("cli.generate", "sample text from a checkpoint"),
    "export": ("cli.export", "write a checkpoint as a Hugging Face transformers folder"),
    "bench": ("cli.bench", "benchmarks: attention approx train preprocess generate kernels gpt"),
}

USAGE = "sbtrain COMMAND [args] [--debug]\n\ncommands:\n" + "\n".join(
    f"  {name:<11} {about}" for name, (_, about) in COMMANDS.items()
)


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error reported like every other bad input: one line, status 2."""

    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)")


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (the console script exits with it). From the
    command line (`argv` None) the process first re-executes itself with the CPU allocator
    preloaded (sbtrain.allocator); a call from Python runs in the calling process as it is."""
    if argv is None:
        try:
            allocator.preload(sys.argv[1:])
        except UserError as e:
            print(f"sbtrain: error: {e}", file=sys.stderr)
            return 2
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(f"sbtrain {__version__} (allocator: {allocator.loaded()})")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"sbtrain: error: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    parser = module.build_parser(
        Parser(
            prog=f"sbtrain {command}",
            description=module.__doc__,  # each front-end's docstring carries its examples
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    try:
        try:
            args = parser.parse_intermixed_args(rest)  # flags may follow key=value overrides
        except TypeError:  # argparse cannot intermix with subcommands (sbtrain bench WHAT)
            args = parser.parse_args(rest)
        status = module.run(args) or 0
    except UserError as e:
        if debug:
            raise
        print(f"sbtrain {command}: error: {e}", file=sys.stderr)
        status = 2
    except KeyboardInterrupt:
        print(f"sbtrain {command}: interrupted", file=sys.stderr)
        status = 130
    except SystemExit as e:  # --help
        status = e.code if isinstance(e.code, int) else 0
    return status
