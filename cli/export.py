"""`dynamic-llava export MODEL_DIR OUT_DIR`: a Hub-ready folder from a saved Dynamic-LLaVA folder."""

from __future__ import annotations

import argparse

from . import common

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("export", help="write a Hub-ready folder from a saved Dynamic-LLaVA folder")
    parser.add_argument("model_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument("--dtype", default="auto")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..hub.export import export_model
    from ..hub.folder import parse_dtype
    from ..hub.loading import check_model_folder

    common.check_out_folder("OUT_DIR", args.out_dir)
    check_model_folder(args.model_dir)
    export_model(
        args.model_dir,
        args.out_dir,
        overwrite=args.overwrite,
        max_shard_size=args.max_shard_size,
        dtype=parse_dtype(args.dtype),
    )
    print(f"wrote {args.out_dir}")
    return 0
