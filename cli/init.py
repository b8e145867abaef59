"""`dynamic-llava init --base ID_OR_DIR --out DIR`: a Dynamic model folder from a stock base model."""

from __future__ import annotations

import argparse

from . import common

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "init",
        help="make a Dynamic model folder from a stock LLaVA-1.5 / LLaVA-NeXT / Qwen2.5-VL (untrained predictors)",
        description=(
            "Keep the stock weights and add fresh, untrained predictors. Until trained (`dynamic-llava train`) the "
            "folder ranks image tokens with the training-free attention scorer and keeps every generated token."
        ),
    )
    parser.add_argument("--base", required=True, help="a stock model: a Hub id or a save_pretrained folder")
    parser.add_argument("--out", required=True, help="the new folder (a non-empty one is refused without --overwrite)")
    parser.add_argument("--sparse-layer", type=int, default=None, help="the first sparse layer (config default 2)")
    parser.add_argument("--vision-keep-rate", type=float, default=None, help="share of image tokens kept (0, 1]")
    parser.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (the stored one)")
    parser.add_argument("--overwrite", action="store_true")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..hub.folder import parse_dtype
    from ..hub.init import init_model

    common.check_out_folder("--out", args.out)
    sparsity = {"sparse_layer": args.sparse_layer, "vision_keep_rate": args.vision_keep_rate}
    folder = init_model(
        args.base,
        args.out,
        overwrite=args.overwrite,
        dtype=parse_dtype(args.dtype),
        **{field: value for field, value in sparsity.items() if value is not None},
    )
    print(f"wrote {folder} (untrained predictors: train them with `dynamic-llava train`)")
    return 0
