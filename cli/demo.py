"""`dynamic-llava demo`: the embedded model answers a question about a synthetic sample (or your image), prints what
it kept and draws the kept patches."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import common
from .common import UsageError
from .flags import add_generation_flags

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo", help="answer a question with the embedded trained model and draw the kept patches"
    )
    add_generation_flags(
        parser,
        prompt="the question (default: the synthetic sample's own, whose answer is known)",
        question_alias=True,
        seed_help="which synthetic sample to ask about; also the sampling seed",
        json_help="print one JSON object (answer, kept patches, picture path, sparsity report) instead of text",
    )
    parser.add_argument("--save", default="kept_patches.png", help="PNG path; an existing file is never replaced")
    parser.set_defaults(run=run, prompt_flag="--prompt/--question")
    return parser


def run(args: argparse.Namespace) -> int:
    import random

    import torch
    from PIL import Image

    from ..synthetic import IMAGE_SIZE
    from ..synthetic.picture import kept_patches_image, save_png, stack_pictures
    from ..synthetic.task import is_correct, make_sample
    from ..transformers_compat import cache_from_output

    common.check_generation_flags(args)
    if Path(args.save).expanduser().is_dir():
        raise UsageError(f"--save {args.save} is a directory; pass a PNG file path in it")
    sample = make_sample(random.Random(args.seed), IMAGE_SIZE)
    images = [common.image_argument(image) for image in args.image] or [sample["image"]]
    question = sample["question"] if args.prompt is None else args.prompt
    folder, processor, config = common.open_model(args)
    inputs = common.prompt_inputs(processor, config, folder, images, question, args.max_new_tokens)
    pixel_values = inputs["pixel_values"]
    model = common.load_weights(folder, args)
    out = common.run_generate(model, inputs, args)
    cache = cache_from_output(out)
    answer = processor.decode(out.sequences[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    kept = [indices.tolist() for indices in cache.kept_vision_indices[0]]
    # what the vision tower saw, back from pixel_values, beside the same with the dropped patches darkened
    mean = torch.tensor(processor.image_processor.image_mean).view(3, 1, 1)
    std = torch.tensor(processor.image_processor.image_std).view(3, 1, 1)
    grid = config.vision_config.image_size // config.vision_config.patch_size
    pictures = []
    for pixels, indices in zip(pixel_values.float(), kept, strict=True):
        rgb = ((pixels * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        pictures.append(kept_patches_image(Image.fromarray(rgb, "RGB"), indices, grid))
    path = save_png(stack_pictures(pictures), args.save)
    judged = not args.image and args.prompt is None  # the synthetic sample's own question: its answer is known
    correct = is_correct(answer, sample) if judged else None
    shown_images = args.image or [f"synthetic sample, seed {args.seed}"]
    if args.json:
        result = {
            "model": str(args.model or folder),
            "images": shown_images,
            "question": question,
            "answer": answer,
            "expected": sample["answer"] if judged else None,
            "correct": correct,
            "kept_vision_patches": kept,
            "picture": str(path),
            "sparsity": cache.sparsity_report(),
        }
        print(json.dumps(result))
        return 0
    if common.is_demo_model(folder):
        print(
            f"Dynamic-LLaVA demo: the embedded model ({folder.name}), 1.3 M parameters, "
            "trained on the synthetic shapes task"
        )
    else:
        print(f"Dynamic-LLaVA demo: {args.model}")
    print(f"image: {', '.join(shown_images)}")
    print(f"question: {question}")
    print(f"answer: {answer}")
    if judged:
        print(f"expected: {sample['answer']} ({'correct' if correct else 'WRONG'})")
    print(common.summary_line(cache, model.config))
    for number, indices in enumerate(kept, start=1):
        which = f" of image {number}" if len(kept) > 1 else ""
        print(f"kept vision patches{which} (row-major, {grid} x {grid} grid): {indices}")
    print(f"wrote {path} (left: the input; right: dropped patches darkened, kept ones outlined)")
    return 0
