"""`dynamic-llava train-synthetic`: a small Dynamic-LLaVA trained from scratch on the synthetic shapes task (the
embedded demo model is one)."""

from __future__ import annotations

import argparse

from . import common
from .flags import non_negative_int, positive_int

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train-synthetic", help="train a small Dynamic-LLaVA from scratch on the synthetic task"
    )
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--base",
        choices=("llava", "qwen2_5_vl"),
        default="llava",
        help="the architecture: LLaVA-1.5 (the embedded demo model) or Qwen2.5-VL",
    )
    parser.add_argument(
        "--vision-steps", type=non_negative_int, default=4000, help="phase 0: the vision tower alone (batch 32)"
    )
    parser.add_argument(
        "--dense-steps", type=non_negative_int, default=3000, help="phase 1: LM and projector, sparsification off"
    )
    parser.add_argument(
        "--sparse-steps", type=non_negative_int, default=2000, help="phase 2: the predictors (Gumbel masks)"
    )
    parser.add_argument(
        "--calibration-samples",
        type=positive_int,
        default=100,
        help="phase 3: prompts whose greedy answers set the output-text threshold",
    )
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..hub.export import export_model
    from ..synthetic.bases import synthetic_base
    from ..synthetic.train import train_synthetic

    common.check_out_folder("--out", args.out)
    model, processor = train_synthetic(
        vision_steps=args.vision_steps,
        dense_steps=args.dense_steps,
        sparse_steps=args.sparse_steps,
        batch_size=args.batch_size,
        seed=args.seed,
        calibration_samples=args.calibration_samples,
        base=args.base,
    )
    about = synthetic_base(args.base).about
    folder = export_model(model, args.out, processor=processor, overwrite=True, about=about)
    print(f"trained model written to {folder}")
    return 0
