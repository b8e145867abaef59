"""`dynamic-llava convert SRC OUT`: an original Dynamic-LLaVA checkpoint (Hub id or folder) -> a Hub-ready folder."""

from __future__ import annotations

import argparse

from . import common

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("convert", help="convert an original Dynamic-LLaVA checkpoint (Hub id or folder)")
    parser.add_argument("src")
    parser.add_argument("out")
    parser.add_argument("--vision-tower", help="CLIP tower folder or Hub id (default: the config's mm_vision_tower)")
    parser.add_argument("--tokenizer", help="tokenizer folder or Hub id (default: the source's, if any)")
    parser.add_argument("--dtype", default=None, help="float16, bfloat16, float32 (default: the source's)")
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument("--push-to-hub", metavar="REPO")
    parser.add_argument("--allow-pickle", action="store_true", help="accept .bin weights (read with weights_only=True)")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--no-verify", action="store_true", help="skip loading the result and running one forward")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..hub.convert import convert_original_checkpoint

    common.check_out_folder("OUT", args.out)
    convert_original_checkpoint(
        args.src,
        args.out,
        vision_tower=args.vision_tower,
        tokenizer=args.tokenizer,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        push_to_hub=args.push_to_hub,
        allow_pickle=args.allow_pickle,
        overwrite=args.overwrite,
        verify=not args.no_verify,
    )
    return 0
