"""The `dynamic-llava` command."""

# Results go to stdout; the library's progress and warnings (the `dynamic_llava` logger, INFO and up) and errors go to
# stderr.

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any


def _demo(args: argparse.Namespace) -> int:
    import random

    import torch
    from PIL import Image

    from .hub.loading import load_for_eval
    from .sparse_cache import cache_from_output
    from .synthetic import DEMO_MODEL, IMAGE_SIZE
    from .synthetic.evaluate import first_image_kept
    from .synthetic.picture import kept_patches_image, save_png
    from .synthetic.task import is_correct, make_sample, vicuna_prompt

    model, processor = load_for_eval(None)
    sample = make_sample(random.Random(args.seed), IMAGE_SIZE)
    image = _image_argument(args.image) if args.image else sample["image"]  # the processor opens a path or URL
    question = args.question or sample["question"]
    if not question.strip():
        raise ValueError("--question is empty; ask about the colour, kind or position of the shape")
    inputs = processor(images=image, text=vicuna_prompt(question), return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=args.max_new_tokens, do_sample=False, return_dict_in_generate=True
        )
    cache = cache_from_output(out)
    answer = processor.decode(out.sequences[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    kept = first_image_kept(cache, 0)
    print(
        f"Dynamic-LLaVA demo: the embedded model ({DEMO_MODEL.name}), trained on this CPU on the synthetic shapes task"
    )
    print(f"image: {args.image or f'synthetic sample, seed {args.seed}'}")
    print(f"question: {question}")
    print(f"answer: {answer}")
    if not args.image and not args.question:
        verdict = "correct" if is_correct(answer, sample) else "WRONG"
        print(f"expected: {sample['answer']} ({verdict})")
    print(summary_line(cache, model.config))
    print(f"kept vision patches (row-major, 8 x 8 grid): {kept}")
    # what the vision tower saw, back from pixel_values
    mean = torch.tensor(processor.image_processor.image_mean).view(3, 1, 1)
    std = torch.tensor(processor.image_processor.image_std).view(3, 1, 1)
    pixels = ((inputs["pixel_values"][0] * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    path = save_png(kept_patches_image(Image.fromarray(pixels, "RGB"), kept, grid), args.save)
    print(f"wrote {path} (left: the input; right: dropped patches darkened, kept ones outlined)")
    if args.json:
        print(json.dumps(cache.sparsity_report()))
    return 0


def _image_argument(image: str) -> str:
    """`--image`: an http(s) URL as given, or the path (`~` expanded) of an existing file; the processor opens it."""
    from pathlib import Path

    if image.startswith(("http://", "https://")):
        return image
    path = Path(image).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"image {image!r} does not exist; pass an image file path or an http(s) URL")
    return str(path)


def _dtype(name: str | None) -> Any:
    from .hub.folder import parse_dtype

    return parse_dtype(name) or "auto"


def _generate(args: argparse.Namespace) -> int:
    import torch

    from .hub.loading import load_processor, resolve_model
    from .modeling_dynamic_llava import DynamicLlavaForConditionalGeneration
    from .sparse_cache import cache_from_output

    if not args.prompt or not args.prompt.strip():
        raise ValueError("--prompt is empty; ask a question about the image")
    image = _image_argument(args.image)
    if args.model is None:
        from .synthetic import DEMO_MODEL

        print(
            "[model] none given: the embedded demo model, which only knows the synthetic shapes task", file=sys.stderr
        )
        args.model = str(DEMO_MODEL)
    folder = str(resolve_model(args.model))
    kwargs = {"dtype": _dtype(args.dtype)}
    if args.device_map:
        kwargs["device_map"] = args.device_map
    if args.load_in_4bit or args.load_in_8bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=args.load_in_4bit, load_in_8bit=args.load_in_8bit
        )
    if args.no_sparsity:
        kwargs.update(use_vision_predictor=False, use_output_text_predictor=False)
    processor = load_processor(folder)
    if processor is None:
        raise ValueError(f"{args.model} has no tokenizer; convert it with --tokenizer to add one")
    model = DynamicLlavaForConditionalGeneration.from_pretrained(folder, **kwargs).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.prompt}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt").to(model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=args.max_new_tokens, do_sample=False, return_dict_in_generate=True
        )
    cache = cache_from_output(out)
    answer = processor.decode(out.sequences[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    print(answer.strip())
    print(summary_line(cache, model.config))
    return 0


def summary_line(cache: Any, config: Any) -> str:
    """One line: vision tokens kept, generated tokens kept, KV-cache bytes vs a dense cache (row 0)."""
    report = cache.sparsity_report()
    vision = report["vision_tokens_kept"][0]
    kept_v = f"{sum(vision)}/{config.image_seq_length * len(vision)}" if vision else "no image"
    scored = report["output_text_scored"][0]
    kept_t = f"{report['output_text_kept'][0]}/{scored}" if scored else "0/0"
    ratio = report["kv_bytes_ratio"]
    return (
        f"[sparsity] vision tokens kept {kept_v}; generated tokens kept {kept_t}; KV cache "
        f"{report['stored_bytes']:,} bytes vs dense {report['dense_bytes']:,}"
        + (f" ({ratio:.1%})" if ratio is not None else "")
    )


def _convert(args: argparse.Namespace) -> int:
    from .hub.convert import convert_original_checkpoint

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


def _export(args: argparse.Namespace) -> int:
    from .hub.export import export_model
    from .hub.folder import parse_dtype

    export_model(
        args.model_dir,
        args.out_dir,
        overwrite=args.overwrite,
        max_shard_size=args.max_shard_size,
        dtype=parse_dtype(args.dtype),
    )
    print(f"wrote {args.out_dir}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .bench.run import format_table, run_bench

    if args.model and args.preset:
        raise ValueError("pass --model or --preset, not both")
    results = run_bench(
        model=args.model,
        preset=args.preset or "llava15-cpu",
        batch_size=args.batch_size,
        new_tokens=args.new_tokens,
        dtype=args.dtype,
        device=args.device,
        repeats=args.repeats,
        out=args.out,
        throughput_tokens=args.throughput_tokens,
    )
    print(format_table(results))
    return 0


def _train(args: argparse.Namespace) -> int:
    from .training.trainer import train

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


def _evaluate(args: argparse.Namespace) -> int:
    from .hub.loading import load_for_eval
    from .synthetic.evaluate import evaluate_synthetic

    if args.task != "synthetic":
        raise ValueError(f"unknown task {args.task!r}; the one task is 'synthetic'")
    model, processor = load_for_eval(args.model)
    result = evaluate_synthetic(
        model, processor, n=args.n, seed=args.seed, no_sparsity=args.no_sparsity, max_new_tokens=args.max_new_tokens
    )
    print(json.dumps(result))
    return 0


def _synthetic_data(args: argparse.Namespace) -> int:
    from .synthetic.train import write_synthetic_dataset

    folder = write_synthetic_dataset(args.out, n=args.n, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote {args.n} samples: --data {folder / 'data.json'} --images {folder / 'images'}")
    return 0


def _train_synthetic(args: argparse.Namespace) -> int:
    from .synthetic.train import train_synthetic

    folder = train_synthetic(
        args.out,
        vision_steps=args.vision_steps,
        dense_steps=args.dense_steps,
        sparse_steps=args.sparse_steps,
        batch_size=args.batch_size,
        seed=args.seed,
        calibration_samples=args.calibration_samples,
    )
    print(f"trained model written to {folder}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="dynamic-llava", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="answer a question with the embedded trained model and draw the kept patches")
    demo.add_argument("--seed", type=int, default=0, help="which synthetic sample to ask about")
    demo.add_argument("--image", help="your own image instead (the model only knows the synthetic shapes)")
    demo.add_argument("--question", help="default: the synthetic sample's question")
    demo.add_argument("--save", default="kept_patches.png", help="PNG path; an existing file is never replaced")
    demo.add_argument("--max-new-tokens", type=int, default=80)
    demo.add_argument("--json", action="store_true", help="also print the sparsity report as JSON")
    demo.set_defaults(func=_demo)

    gen = sub.add_parser("generate", help="answer a question about an image and print what was kept")
    gen.add_argument(
        "--model",
        help="folder or Hub id of a converted/exported Dynamic-LLaVA (default: the embedded "
        "demo model, trained on the synthetic shapes task)",
    )
    gen.add_argument("--image", required=True, help="image path or URL")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--device-map", default=None, help='e.g. "auto"')
    gen.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16")
    quant = gen.add_mutually_exclusive_group()
    quant.add_argument("--load-in-4bit", action="store_true")
    quant.add_argument("--load-in-8bit", action="store_true")
    gen.add_argument("--no-sparsity", action="store_true", help="turn both predictors off (stock LLaVA compute)")
    gen.set_defaults(func=_generate)

    conv = sub.add_parser("convert", help="convert an original Dynamic-LLaVA checkpoint (Hub id or folder)")
    conv.add_argument("src")
    conv.add_argument("out")
    conv.add_argument("--vision-tower", help="CLIP tower folder or Hub id (default: the config's mm_vision_tower)")
    conv.add_argument("--tokenizer", help="tokenizer folder or Hub id (default: the source's, if any)")
    conv.add_argument("--dtype", default=None, help="float16, bfloat16, float32 (default: the source's)")
    conv.add_argument("--max-shard-size", default="5GB")
    conv.add_argument("--push-to-hub", metavar="REPO")
    conv.add_argument("--allow-pickle", action="store_true", help="accept .bin weights (read with weights_only=True)")
    conv.add_argument("--overwrite", action="store_true")
    conv.add_argument("--no-verify", action="store_true", help="skip loading the result and running one forward")
    conv.set_defaults(func=_convert)

    bench = sub.add_parser("bench", help="measure ours vs stock LLaVA on the same weights (ratios, one run)")
    bench.add_argument("--model", help="a Dynamic-LLaVA folder (default: a random model of --preset)")
    bench.add_argument("--preset", choices=["llava15-cpu", "llava15-7b"], help="default llava15-cpu")
    bench.add_argument("--batch-size", type=int, default=1)
    bench.add_argument("--new-tokens", type=int, default=512)
    bench.add_argument("--throughput-tokens", type=int, default=64, help="new tokens of the batch-1/8 throughput runs")
    bench.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--out", default=None, help="folder for results.json and the plots")
    bench.set_defaults(func=_bench)

    tr = sub.add_parser("train", help="train the predictors under the stock Trainer on LLaVA conversation JSON")
    tr.add_argument("--data", required=True, help="LLaVA conversation JSON")
    tr.add_argument("--images", required=True, help="folder of the samples' images")
    tr.add_argument("--model", required=True, help="a Dynamic-LLaVA folder with its processor (convert/export)")
    tr.add_argument("--out", required=True, help="checkpoints go to OUT/checkpoints, the model to OUT/model")
    tr.add_argument("--epochs", type=float, default=1.0)
    tr.add_argument("--max-steps", type=int, default=-1)
    tr.add_argument("--batch-size", type=int, default=4)
    tr.add_argument("--grad-accum", type=int, default=1)
    tr.add_argument("--predictor-lr", type=float, default=2e-4)
    tr.add_argument("--lr", type=float, default=5e-6)
    tr.add_argument("--unfreeze-vision-tower", action="store_true")
    tr.add_argument("--freeze-projector", action="store_true")
    tr.add_argument("--freeze-llm", action="store_true")
    tr.add_argument("--save-steps", type=int, default=500)
    tr.add_argument("--logging-steps", type=int, default=10)
    tr.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUT/checkpoints")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--max-length", type=int, default=2048)
    tr.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp16"),
        default="fp32",
        help="bf16/fp16: mixed-precision autocast on a GPU (weights stay fp32)",
    )
    tr.set_defaults(func=_train)

    ev = sub.add_parser("evaluate", help="answer N fresh synthetic questions; print one JSON line")
    ev.add_argument("--task", default="synthetic")
    ev.add_argument("--n", type=int, default=500)
    ev.add_argument("--seed", type=int, default=12345)
    ev.add_argument("--model", default=None, help="a folder trained on the synthetic task (default: the embedded one)")
    ev.add_argument("--no-sparsity", action="store_true")
    ev.add_argument("--max-new-tokens", type=int, default=64)
    ev.set_defaults(func=_evaluate)

    ts = sub.add_parser("train-synthetic", help="train a small Dynamic-LLaVA from scratch on the synthetic task")
    ts.add_argument("--out", required=True)
    ts.add_argument("--vision-steps", type=int, default=4000, help="phase 0: the vision tower alone (batch 32)")
    ts.add_argument("--dense-steps", type=int, default=3000, help="phase 1: LM and projector, sparsification off")
    ts.add_argument("--sparse-steps", type=int, default=2000, help="phase 2: the predictors (Gumbel masks)")
    ts.add_argument(
        "--calibration-samples",
        type=int,
        default=100,
        help="phase 3: prompts whose greedy answers set the output-text threshold",
    )
    ts.add_argument("--batch-size", type=int, default=16)
    ts.add_argument("--seed", type=int, default=0)
    ts.set_defaults(func=_train_synthetic)

    sd = sub.add_parser("synthetic-data", help="write synthetic samples as LLaVA conversation JSON and PNGs for train")
    sd.add_argument("--out", required=True, help="a new folder: OUT/data.json and OUT/images/")
    sd.add_argument("--n", type=int, default=1000)
    sd.add_argument("--seed", type=int, default=0)
    sd.add_argument("--overwrite", action="store_true", help="replace OUT if it is not empty")
    sd.set_defaults(func=_synthetic_data)

    exp = sub.add_parser("export", help="write a Hub-ready folder from a saved Dynamic-LLaVA folder")
    exp.add_argument("model_dir")
    exp.add_argument("out_dir")
    exp.add_argument("--overwrite", action="store_true")
    exp.add_argument("--max-shard-size", default="5GB")
    exp.add_argument("--dtype", default="auto")
    exp.set_defaults(func=_export)
    return parser


@contextlib.contextmanager
def _library_logging() -> Iterator[None]:
    """For the duration of a command: the package's log records (INFO and up) to stderr, one plain line each."""
    logger = logging.getLogger("dynamic_llava")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    saved_level, saved_propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved_level)
        logger.propagate = saved_propagate


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command in `argv` (default: the process arguments); returns the exit code (2 on a usage error)."""
    args = build_parser().parse_args(argv)
    try:
        with _library_logging():
            return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, OSError) as error:
        print(f"dynamic-llava {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
