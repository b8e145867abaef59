"""`dynamic-llava export [MODEL] OUT_DIR`: a Hub-ready folder from a saved Dynamic model folder (or Hub id), by default
the embedded demo model."""

from __future__ import annotations

import argparse

from . import common

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "export",
        help="write a Hub-ready folder from a saved Dynamic model folder (default: the embedded demo model)",
        description=(
            "Write a Hub-ready folder: remote code, auto_map, safetensors, processor files; the source folder's model "
            "card is kept. A non-empty OUT_DIR is refused before anything is loaded, unless --overwrite."
        ),
    )
    parser.add_argument("paths", nargs="+", metavar="[MODEL] OUT_DIR", help="MODEL: a folder or Hub id (default: demo)")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument("--dtype", default="auto")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..files import refuse_existing_output
    from ..hub.export import export_model
    from ..hub.folder import parse_dtype
    from ..hub.loading import model_folder

    if len(args.paths) > 2:
        raise common.UsageError(f"export takes [MODEL] OUT_DIR, got {len(args.paths)} paths: {' '.join(args.paths)}")
    model, out = (None, args.paths[0]) if len(args.paths) == 1 else args.paths
    common.check_out_folder("OUT_DIR", out)
    refuse_existing_output(out, args.overwrite)  # (before anything is loaded)
    folder = model_folder(model)  # (the embedded demo model when MODEL is left out)
    export_model(
        folder, out, overwrite=args.overwrite, max_shard_size=args.max_shard_size, dtype=parse_dtype(args.dtype)
    )
    print(f"wrote {out}")
    return 0
