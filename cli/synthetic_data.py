"""`dynamic-llava synthetic-data`: synthetic samples as LLaVA conversation JSON and PNGs, for `dynamic-llava train`."""

from __future__ import annotations

import argparse

from . import common
from .flags import positive_int

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "synthetic-data", help="write synthetic samples as LLaVA conversation JSON and PNGs for train"
    )
    parser.add_argument("--out", required=True, help="a new folder: OUT/data.json and OUT/images/")
    parser.add_argument("--n", type=positive_int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it is not empty")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    common.check_out_folder("--out", args.out)
    from ..synthetic.train import write_synthetic_dataset

    folder = write_synthetic_dataset(args.out, n=args.n, seed=args.seed, overwrite=args.overwrite, progress=True)
    print(f"wrote {args.n} samples: --data {folder / 'data.json'} --images {folder / 'images'}")
    return 0
