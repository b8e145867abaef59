"""`dynamic-llava train`: the predictors trained under the stock Trainer on LLaVA conversation JSON (the paper's
recipe; `accelerate launch -m dynamic_llava.cli train ...` for DDP)."""

from __future__ import annotations

import argparse
import os

from . import common
from .flags import positive_float, positive_int

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train", help="train the predictors under the stock Trainer on LLaVA conversation JSON"
    )
    parser.add_argument("--data", required=True, help="LLaVA conversation JSON")
    parser.add_argument("--images", required=True, help="folder of the samples' images")
    parser.add_argument("--model", required=True, help="a Dynamic-LLaVA folder with its processor (convert/export)")
    parser.add_argument("--out", required=True, help="checkpoints go to OUT/checkpoints, the model to OUT/model")
    parser.add_argument("--epochs", type=positive_float, default=1.0)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--batch-size", type=positive_int, default=4)
    parser.add_argument("--grad-accum", type=positive_int, default=1)
    parser.add_argument("--predictor-lr", type=positive_float, default=2e-4)
    parser.add_argument("--lr", type=positive_float, default=5e-6)
    parser.add_argument("--unfreeze-vision-tower", action="store_true")
    parser.add_argument("--freeze-projector", action="store_true")
    parser.add_argument("--freeze-llm", action="store_true")
    parser.add_argument("--save-steps", type=positive_int, default=500)
    parser.add_argument("--logging-steps", type=positive_int, default=10)
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUT/checkpoints")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-length", type=positive_int, default=2048)
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp16"),
        default="fp32",
        help="bf16/fp16: mixed-precision autocast on a GPU (weights stay fp32)",
    )
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..training.trainer import train

    common.check_out_folder("--out", args.out)
    folder = train(
        args.data,
        args.images,
        args.model,
        args.out,
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        predictor_lr=args.predictor_lr,
        lr=args.lr,
        freeze_vision_tower=not args.unfreeze_vision_tower,
        freeze_projector=args.freeze_projector,
        freeze_llm=args.freeze_llm,
        save_steps=args.save_steps,
        logging_steps=args.logging_steps,
        resume=args.resume,
        seed=args.seed,
        max_length=args.max_length,
        precision=args.precision,
    )
    if os.environ.get("RANK", "0") == "0":  # under accelerate launch / torchrun, the main process reports
        print(f"trained model written to {folder}")
    return 0
