"""`dynamic-llava serve ...`: every argument goes to `dynamic_llava.serving.main`, which parses its own flags (its
`--help` included)."""

from __future__ import annotations

import argparse

from .common import UsageError

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "serve", add_help=False, help="an OpenAI-compatible server (`dynamic-llava serve --help`)"
    )
    parser.set_defaults(run=run, passes_rest=True)
    return parser


def run(args: argparse.Namespace) -> int:
    try:
        from ..serving import main as serve_main
    except ImportError as error:
        raise UsageError(f"the server is not available in this installation ({error})") from None
    return serve_main(list(args.rest))
