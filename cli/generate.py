"""`dynamic-llava generate`: answer a prompt (about images) and print what was kept."""

from __future__ import annotations

import argparse
import json

from . import common
from .flags import add_generation_flags

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("generate", help="answer a prompt (about images) and print what was kept")
    add_generation_flags(parser, prompt="what to ask", prompt_required=True)
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..transformers_compat import cache_from_output

    common.check_generation_flags(args)
    images = [common.image_argument(image) for image in args.image]
    folder, processor, config = common.open_model(args, announce_default=True)
    inputs = common.prompt_inputs(processor, config, folder, images, args.prompt, args.max_new_tokens)
    prompt_tokens = inputs["input_ids"].shape[1]
    model = common.load_weights(folder, args)
    out = common.run_generate(model, inputs, args)
    cache = cache_from_output(out)
    answer = processor.decode(out.sequences[0, prompt_tokens:], skip_special_tokens=True).strip()
    if args.json:
        result = {
            "model": str(args.model or folder),
            "images": args.image,
            "prompt": args.prompt,
            "answer": answer,
            "prompt_tokens": prompt_tokens,
            "new_tokens": out.sequences.shape[1] - prompt_tokens,
            "sparsity": cache.sparsity_report(),
        }
        print(json.dumps(result))
    else:
        print(answer)
        print(common.summary_line(cache, model.config))
    return 0
