"""What the commands share when they run: the usage error, the checks of paths and devices, the sparsity of a call
(`sparsity_kwargs`, by `sparsity_options.sparsity_request`), opening a model and its processor, one user turn's
inputs, one `generate()`, the one-line sparsity summary, and the library's log lines on stderr.

torch and transformers are imported inside the functions only.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..sparsity_options import NO_SPARSITY, sparsity_options, sparsity_request
from .flags import flag_spelling

logger = logging.getLogger("dynamic_llava.cli")  # not __name__: under `python -m` that is "__main__"

# `--device` values that are accelerate device maps rather than one device
DEVICE_MAP_NAMES = ("auto", "balanced", "balanced_low_0", "sequential")


class UsageError(Exception):
    """A bad argument or input: the command prints it as one line on stderr and exits with code 2."""


def one_line(error: BaseException) -> str:
    """An error's message on one line (a multi-line message joined; the type's name if it has none)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines) if lines else type(error).__name__


@contextlib.contextmanager
def library_logging() -> Iterator[None]:
    """For the duration of a command: the package's log records (INFO and up) to stderr, one plain line each."""
    package_logger = logging.getLogger("dynamic_llava")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    saved_level, saved_propagate = package_logger.level, package_logger.propagate
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.INFO)
    package_logger.propagate = False
    try:
        yield
    finally:
        package_logger.removeHandler(handler)
        package_logger.setLevel(saved_level)
        package_logger.propagate = saved_propagate


# ---- checks of paths, devices, packages ------------------------------------------------------------------------------


def image_argument(image: str) -> str:
    """`--image`: an http(s) URL as given, or the path (`~` expanded) of an existing file; the processor opens it."""
    if image.startswith(("http://", "https://")):
        return image
    if not image.strip():
        raise UsageError("an image path is empty; pass an image file path or an http(s) URL")
    path = Path(image).expanduser()
    if path.is_dir():
        raise UsageError(f"image {image!r} is a directory; pass an image file in it (PNG, JPEG, ...) or an http(s) URL")
    if not path.is_file():
        raise UsageError(f"image {image!r} does not exist; pass an image file path or an http(s) URL")
    return str(path)


def readable_image(image: str) -> str:
    """`image_argument`, and a local file must also open as an image now (chat reports it at `/image`, not later)."""
    image = image_argument(image)
    if not image.startswith(("http://", "https://")):
        from ..processor.image_processing_dynamic_llava import load_image_file

        load_image_file(image)  # ValueError naming the file and the fix
    return image


def check_out_folder(flag: str, out: str | os.PathLike | None) -> None:
    """An output folder argument must not name an existing file."""
    if out is not None and Path(out).expanduser().exists() and not Path(out).expanduser().is_dir():
        raise UsageError(f"{flag} {out} is a file; pass a folder path (a new or empty folder)")


def installed(module: str) -> bool:
    """Whether `module` can be imported (without importing it)."""
    import importlib.util

    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_device(flag: str, value: str | None, allow_maps: bool) -> None:
    """A device (or, with `allow_maps`, an accelerate device map name) that this torch build can use."""
    if value is None or (allow_maps and value in DEVICE_MAP_NAMES):
        return
    import torch

    maps = ", or a device map: " + ", ".join(DEVICE_MAP_NAMES) if allow_maps else ""
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise UsageError(f"{flag} {value!r} is not a device; use cpu, cuda, cuda:N or mps{maps}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
                raise UsageError(
                    f"{flag} {value}: CUDA is not available in this torch build (torch {torch.__version__} is "
                    "CPU-only); use --device cpu, or install a CUDA build of torch"
                )
            raise UsageError(
                f"{flag} {value}: no CUDA device is visible (torch.cuda.is_available() is False; check the driver "
                "and CUDA_VISIBLE_DEVICES); use --device cpu"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UsageError(f"{flag} {value}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"{flag} {value}: MPS is not available on this machine or torch build; use --device cpu")


def quantization_flag(args: argparse.Namespace) -> str | None:
    if getattr(args, "load_in_4bit", False):
        return "--load-in-4bit"
    if getattr(args, "load_in_8bit", False):
        return "--load-in-8bit"
    return None


# ---- the flags of one call -------------------------------------------------------------------------------------------


def sparsity_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """
    The per-call sparsity keywords of `generate()` that the sparsity flags ask for (none: the config's), by the rules
    every front-end shares (`sparsity_request`); a conflict is a `ValueError` naming the flags.
    """
    values = {option.field: getattr(args, option.field, None) for option in sparsity_options()}
    return sparsity_request(values, getattr(args, NO_SPARSITY, False), spell=flag_spelling)


def check_generation_flags(args: argparse.Namespace) -> None:
    """The checks of the shared flags, before anything is loaded."""
    from ..hub.folder import parse_dtype

    prompt = getattr(args, "prompt", None)
    if prompt is not None and not prompt.strip():
        raise UsageError(f"{getattr(args, 'prompt_flag', '--prompt')} is empty; ask a question about the image")
    sampling = [flag for flag, value in (("--temperature", args.temperature), ("--top-k", args.top_k)) if value]
    sampling += ["--top-p"] if args.top_p is not None else []
    if sampling and not args.do_sample:
        raise UsageError(f"{', '.join(sampling)} only apply when sampling; add --do-sample (default: greedy)")
    sparsity_kwargs(args)
    try:
        parse_dtype(args.dtype)
    except ValueError as error:
        raise UsageError(f"--dtype: {error}") from None
    check_device("--device", args.device_map, allow_maps=True)
    flag = quantization_flag(args)
    if flag and not installed("bitsandbytes"):
        raise UsageError(f'{flag} needs bitsandbytes, which is not installed: pip install -e ".[quant]"')


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Greedy unless --do-sample; beams with --num-beams."""
    kwargs: dict[str, Any] = {"do_sample": args.do_sample, "num_beams": args.num_beams}
    for name in ("temperature", "top_k", "top_p"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    return kwargs


def generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"max_new_tokens": args.max_new_tokens, **sampling_kwargs(args), **sparsity_kwargs(args)}


# ---- the model, the prompt, one generate() ---------------------------------------------------------------------------


def open_model(args: argparse.Namespace, announce_default: bool = False) -> tuple[Path, Any, Any]:
    """The checked model folder, its processor and its config (the weights are loaded by `load_weights`)."""
    from ..hub.bases import base_of_folder
    from ..hub.loading import load_processor, model_folder

    if args.model is None and announce_default:
        print(
            "[model] none given: the embedded demo model, which only knows the synthetic shapes task", file=sys.stderr
        )
    folder = model_folder(args.model)
    processor = load_processor(folder)
    if processor is None:
        raise UsageError(
            f"{args.model or folder} has no tokenizer (tokenizer_config.json); convert it with --tokenizer to add one"
        )
    return folder, processor, base_of_folder(folder).load_config_class().from_pretrained(str(folder))


def load_weights(folder: Path, args: argparse.Namespace) -> Any:
    from ..hub.folder import parse_dtype
    from ..hub.loading import load_model

    quantization = None
    if quantization_flag(args):
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig(load_in_4bit=args.load_in_4bit, load_in_8bit=args.load_in_8bit)
    return load_model(
        folder, dtype=parse_dtype(args.dtype), device_map=args.device_map, quantization_config=quantization
    )


def is_demo_model(folder: Path) -> bool:
    from ..package_data import DEMO_MODEL

    return Path(folder).resolve() == DEMO_MODEL.resolve()


def check_positions(tokens: int, max_new_tokens: int, config: Any, what: str = "prompt", fix: str = "") -> None:
    """Refuse a prompt that, with `max_new_tokens` more, needs more positions than the model has."""
    limit = config.text_config.max_position_embeddings
    if tokens + max_new_tokens <= limit:
        return
    where = f"the model has {limit:,} positions (text_config.max_position_embeddings)"
    fix = f"; {fix}" if fix else ""
    if tokens >= limit:
        raise UsageError(f"the {what} is {tokens:,} tokens but {where}; shorten it{fix}")
    raise UsageError(
        f"the {what} is {tokens:,} tokens and --max-new-tokens {max_new_tokens} asks for up to {max_new_tokens} more, "
        f"{tokens + max_new_tokens:,} in all, but {where}; shorten the {what} or pass --max-new-tokens "
        f"{limit - tokens} or less{fix}"
    )


def warn_unknown_words(tokenizer: Any, text: str, folder: Path) -> int:
    """One warning (stderr) when words of `text` are out of the tokenizer's vocabulary (read as <unk>); their count."""
    unk = tokenizer.unk_token_id
    if unk is None:
        return 0
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        spans = [
            span for token, span in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True) if token == unk
        ]
    except (NotImplementedError, ValueError, TypeError, KeyError):  # a slow tokenizer: no offsets
        spans = [None for token in tokenizer(text, add_special_tokens=False)["input_ids"] if token == unk]
    if not spans:
        return 0
    words = list(dict.fromkeys(text[span[0] : span[1]] for span in spans if span is not None))
    shown = (": " + ", ".join(repr(word) for word in words[:5]) + (", ..." if len(words) > 5 else "")) if words else ""
    note = " (the embedded demo model knows only the synthetic task's words)" if is_demo_model(folder) else ""
    logger.warning(
        f"warning: {len(spans)} word(s) of the prompt are not in the model's vocabulary and were read as "
        f"{tokenizer.unk_token}{shown}{note}"
    )
    return len(spans)


def check_text(processor: Any, text: str) -> None:
    image_token = getattr(processor, "image_token", "<image>")
    if image_token in text:
        raise UsageError(f"the prompt contains {image_token}; pass images with --image (one {image_token} each)")


def prompt_inputs(
    processor: Any, config: Any, folder: Path, images: list, prompt: str, max_new_tokens: int
) -> dict[str, Any]:
    """The processor's inputs for one user turn (images first, then the prompt), checked against the model."""
    check_text(processor, prompt)
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(images=images or None, text=text, return_tensors="pt")
    check_positions(inputs["input_ids"].shape[1], max_new_tokens, config)
    warn_unknown_words(processor.tokenizer, prompt, folder)
    return inputs


def to_model(inputs: Any, model: Any) -> Any:
    """`inputs` on the model's device, images in its dtype."""
    import torch

    inputs = inputs.to(model.device)
    pixels = inputs.get("pixel_values")
    if pixels is not None and torch.is_floating_point(pixels) and model.dtype.is_floating_point:
        inputs["pixel_values"] = pixels.to(model.dtype)
    return inputs


def run_generate(model: Any, inputs: Any, args: argparse.Namespace, **extra: Any) -> Any:
    import torch

    if args.do_sample:
        torch.manual_seed(args.seed)
    with torch.no_grad():
        return model.generate(
            **to_model(inputs, model), return_dict_in_generate=True, **generation_kwargs(args), **extra
        )


def summary_line(cache: Any, config: Any) -> str:
    """One line: vision tokens kept, generated tokens kept, KV-cache bytes vs a dense cache (row 0)."""
    report = cache.sparsity_report()
    vision = report["vision_tokens_kept"][0]
    per_image = getattr(config, "tokens_per_image", None)  # (None: a base whose images have their own token counts)
    if not vision:
        kept_v = "no image"
    else:
        kept_v = f"{sum(vision)}/{per_image * len(vision)}" if per_image else f"{sum(vision)} ({len(vision)} image(s))"
    scored = report["output_text_scored"][0]
    kept_t = f"{report['output_text_kept'][0]}/{scored}" if scored else "0/0"
    ratio = report["kv_bytes_ratio"]
    return (
        f"[sparsity] vision tokens kept {kept_v}; generated tokens kept {kept_t}; KV cache "
        f"{report['stored_bytes']:,} bytes vs dense {report['dense_bytes']:,}"
        + (f" ({ratio:.1%})" if ratio is not None else "")
    )
