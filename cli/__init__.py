"""The `dynamic-llava` command: one module per subcommand (`add_parser(subparsers)`, `run(args)`), the flags they
share in `flags`, what they share when they run in `common`.

Results go to stdout; the library's progress and warnings (the `dynamic_llava` logger, INFO and up), progress bars and
errors go to stderr. A bad argument or input is one line on stderr and exit code 2. torch and transformers are
imported inside the commands only: `--help` and `--version` load neither.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .common import UsageError, library_logging, one_line
from .flags import Parser, VersionAction

__all__ = ["COMMANDS", "build_parser", "main"]

# the subcommands' modules, in the order `--help` lists them
COMMANDS = (
    "demo",
    "generate",
    "chat",
    "evaluate",
    "convert",
    "init",
    "bench",
    "train",
    "train_synthetic",
    "synthetic_data",
    "export",
    "serve",
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = Parser(
        prog="dynamic-llava",
        description="Dynamic-LLaVA (ICLR 2025) as a transformers model: run, chat, evaluate, convert, train, bench.",
    )
    parser.add_argument("--version", action=VersionAction, help="print the installed version and exit")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command in `argv` (default: the process arguments); returns the exit code (2 on a usage error)."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "passes_rest", False):
        prog = f"dynamic-llava {args.command}"
        parser.exit(2, f"{prog}: error: unrecognized arguments: {' '.join(rest)} (see `{prog} --help`)\n")
    args.rest = rest
    try:
        with library_logging():
            return args.run(args)
    except (UsageError, ValueError, TypeError, OSError, ImportError) as error:
        print(f"dynamic-llava {args.command}: error: {one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dynamic-llava {args.command}: interrupted", file=sys.stderr)
        return 130
