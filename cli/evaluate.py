"""`dynamic-llava evaluate`: answer N fresh synthetic questions; print one JSON line (accuracy and what was kept)."""

from __future__ import annotations

import argparse
import json

from . import common
from .common import UsageError
from .flags import add_generation_flags, positive_int

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("evaluate", help="answer N fresh synthetic questions; print one JSON line")
    parser.add_argument("--task", default="synthetic", help="the one task: synthetic")
    parser.add_argument("--n", type=positive_int, default=500, help="questions (default %(default)s)")
    add_generation_flags(
        parser,
        images=False,
        seed_default=12345,
        seed_help="which questions (the synthetic stream); also the sampling seed",
        json_help="the output is always one JSON object (accepted for the shared flag set)",
    )
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    import torch

    from ..synthetic import IMAGE_SIZE
    from ..synthetic.bases import synthetic_base
    from ..synthetic.evaluate import evaluate_synthetic
    from ..synthetic.task import make_sample, prompt_inputs, sample_rng

    if args.task != "synthetic":
        raise UsageError(f"unknown task {args.task!r}; the one task is 'synthetic'")
    common.check_generation_flags(args)
    folder, processor, config = common.open_model(args)
    # the questions are short and alike: the first one stands for all in the position check
    try:
        image = synthetic_base(config.model_type).image_placeholder
    except ValueError as error:
        raise UsageError(f"{folder}: {error}") from None
    first = prompt_inputs(processor, [make_sample(sample_rng(args.seed, 0), IMAGE_SIZE)], image=image)
    common.check_positions(first["input_ids"].shape[1], args.max_new_tokens, config)
    model = common.load_weights(folder, args)
    if args.do_sample:
        torch.manual_seed(args.seed)
    result = evaluate_synthetic(
        model,
        processor,
        n=args.n,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        generate_kwargs=common.sampling_kwargs(args),
        progress=True,
        **common.sparsity_kwargs(args),
    )
    print(json.dumps(result))
    return 0
