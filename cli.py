"""The `dynamic-llava` command.

Results go to stdout; the library's progress and warnings (the `dynamic_llava` logger, INFO and up), progress bars and
errors go to stderr. A bad argument or input is one line on stderr and exit code 2. torch and transformers are
imported inside the commands only: `--help` and `--version` load neither.

`demo`, `generate`, `chat` and `evaluate` share one set of flags (`_add_generation_flags`): the model and where it
runs, the prompt and images, sampling and beams, quantization, and the sparsity of the call, which goes to
`generate()` per call (the model's config is not changed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger("dynamic_llava.cli")  # not __name__: under `python -m` that is "__main__"

# The one default of `demo`, `generate`, `chat` and `evaluate` (the README's quickstart and evaluation use 64 too).
DEFAULT_MAX_NEW_TOKENS = 64
# `--device` values that are accelerate device maps rather than one device
DEVICE_MAP_NAMES = ("auto", "balanced", "balanced_low_0", "sequential")


class UsageError(Exception):
    """A bad argument or input: the command prints it as one line on stderr and exits with code 2."""


# ---- argument types (a bad value is one line, from `_Parser.error`) ------------------------------------------------


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def _positive_int(text: str) -> int:
    value = _whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = _whole_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _number(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def _rate(text: str) -> float:
    value = _number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], e.g. 0.2; got {text}")
    return value


def _int_list(text: str) -> list[int]:
    parts = [part.strip() for part in text.split(",")]
    if not all(parts):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of whole numbers such as 1,8; got {text!r}")
    return [_positive_int(part) for part in parts]


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line on stderr (exit code 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


class _VersionAction(argparse.Action):
    """`--version`: the installed package's version, read only when asked for."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest=dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        print(f"{parser.prog} {package_version()}")
        parser.exit()


def package_version() -> str:
    """The installed `dynamic-llava` distribution's version (importlib.metadata)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dynamic-llava")
    except PackageNotFoundError:
        return "unknown (the dynamic-llava distribution is not installed; pip install -e .)"


# ---- checks shared by the commands ---------------------------------------------------------------------------------


def _image_argument(image: str) -> str:
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


def _readable_image(image: str) -> str:
    """`_image_argument`, and a local file must also open as an image now (chat reports it at `/image`, not later)."""
    image = _image_argument(image)
    if not image.startswith(("http://", "https://")):
        from .processor.image_processing_dynamic_llava import load_image_file

        load_image_file(image)  # ValueError naming the file and the fix
    return image


def _check_out_folder(flag: str, out: str | os.PathLike | None) -> None:
    """An output folder argument must not name an existing file."""
    if out is not None and Path(out).expanduser().exists() and not Path(out).expanduser().is_dir():
        raise UsageError(f"{flag} {out} is a file; pass a folder path (a new or empty folder)")


def _installed(module: str) -> bool:
    """Whether `module` can be imported (without importing it)."""
    import importlib.util

    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _check_device(flag: str, value: str | None, allow_maps: bool) -> None:
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


def _quantization_flag(args: argparse.Namespace) -> str | None:
    if getattr(args, "load_in_4bit", False):
        return "--load-in-4bit"
    if getattr(args, "load_in_8bit", False):
        return "--load-in-8bit"
    return None


def _check_generation_flags(args: argparse.Namespace) -> None:
    """The checks of the shared flags, before anything is loaded."""
    from .hub.folder import parse_dtype

    prompt = getattr(args, "prompt", None)
    if prompt is not None and not prompt.strip():
        raise UsageError(f"{getattr(args, 'prompt_flag', '--prompt')} is empty; ask a question about the image")
    sampling = [flag for flag, value in (("--temperature", args.temperature), ("--top-k", args.top_k)) if value]
    sampling += ["--top-p"] if args.top_p is not None else []
    if sampling and not args.do_sample:
        raise UsageError(f"{', '.join(sampling)} only apply when sampling; add --do-sample (default: greedy)")
    if args.vision_keep_tokens is not None and args.vision_keep_rate is not None:
        raise UsageError("pass --vision-keep-tokens or --vision-keep-rate, not both")
    vision_off = "--no-sparsity" if args.no_sparsity else "--no-vision-predictor" if args.no_vision_predictor else None
    keep = "--vision-keep-tokens" if args.vision_keep_tokens is not None else "--vision-keep-rate"
    if vision_off and (args.vision_keep_tokens is not None or args.vision_keep_rate is not None):
        raise UsageError(f"{keep} sets what the vision predictor keeps, and {vision_off} turns it off; pass one")
    try:
        parse_dtype(args.dtype)
    except ValueError as error:
        raise UsageError(f"--dtype: {error}") from None
    _check_device("--device", args.device_map, allow_maps=True)
    flag = _quantization_flag(args)
    if flag and not _installed("bitsandbytes"):
        raise UsageError(f'{flag} needs bitsandbytes, which is not installed: pip install "dynamic-llava[quant]"')


def _sparsity_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The per-call sparsity arguments of `generate()` that the flags ask for (none: the config's)."""
    kwargs: dict[str, Any] = {}
    if args.no_sparsity or args.no_vision_predictor:
        kwargs["use_vision_predictor"] = False
    if args.no_sparsity or args.no_output_text_predictor:
        kwargs["use_output_text_predictor"] = False
    if args.vision_keep_tokens is not None:
        kwargs["vision_keep_tokens"] = args.vision_keep_tokens
    if args.vision_keep_rate is not None:
        kwargs["vision_keep_rate"] = args.vision_keep_rate
    return kwargs


def _sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Greedy unless --do-sample; beams with --num-beams."""
    kwargs: dict[str, Any] = {"do_sample": args.do_sample, "num_beams": args.num_beams}
    for name in ("temperature", "top_k", "top_p"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    return kwargs


def _generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"max_new_tokens": args.max_new_tokens, **_sampling_kwargs(args), **_sparsity_kwargs(args)}


# ---- the model, the prompt, one generate() ---------------------------------------------------------------------------


def _open_model(args: argparse.Namespace, announce_default: bool = False) -> tuple[Path, Any, Any]:
    """The checked model folder, its processor and its config (the weights are loaded by `_load_weights`)."""
    from .configuration_dynamic_llava import DynamicLlavaConfig
    from .hub.loading import load_processor, model_folder

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
    return folder, processor, DynamicLlavaConfig.from_pretrained(str(folder))


def _load_weights(folder: Path, args: argparse.Namespace) -> Any:
    from .hub.folder import parse_dtype
    from .hub.loading import load_model

    quantization = None
    if _quantization_flag(args):
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig(load_in_4bit=args.load_in_4bit, load_in_8bit=args.load_in_8bit)
    return load_model(
        folder, dtype=parse_dtype(args.dtype), device_map=args.device_map, quantization_config=quantization
    )


def _is_demo_model(folder: Path) -> bool:
    from .synthetic import DEMO_MODEL

    return Path(folder).resolve() == DEMO_MODEL.resolve()


def _check_positions(tokens: int, max_new_tokens: int, config: Any, what: str = "prompt", fix: str = "") -> None:
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


def _warn_unknown_words(tokenizer: Any, text: str, folder: Path) -> int:
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
    note = " (the embedded demo model knows only the synthetic task's words)" if _is_demo_model(folder) else ""
    logger.warning(
        f"warning: {len(spans)} word(s) of the prompt are not in the model's vocabulary and were read as "
        f"{tokenizer.unk_token}{shown}{note}"
    )
    return len(spans)


def _check_text(processor: Any, text: str) -> None:
    image_token = getattr(processor, "image_token", "<image>")
    if image_token in text:
        raise UsageError(f"the prompt contains {image_token}; pass images with --image (one {image_token} each)")


def _prompt_inputs(
    processor: Any, config: Any, folder: Path, images: list, prompt: str, max_new_tokens: int
) -> dict[str, Any]:
    """The processor's inputs for one user turn (images first, then the prompt), checked against the model."""
    _check_text(processor, prompt)
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(images=images or None, text=text, return_tensors="pt")
    _check_positions(inputs["input_ids"].shape[1], max_new_tokens, config)
    _warn_unknown_words(processor.tokenizer, prompt, folder)
    return inputs


def _to_model(inputs: Any, model: Any) -> Any:
    """`inputs` on the model's device, images in its dtype."""
    import torch

    inputs = inputs.to(model.device)
    pixels = inputs.get("pixel_values")
    if pixels is not None and torch.is_floating_point(pixels) and model.dtype.is_floating_point:
        inputs["pixel_values"] = pixels.to(model.dtype)
    return inputs


def _run_generate(model: Any, inputs: Any, args: argparse.Namespace, **extra: Any) -> Any:
    import torch

    if args.do_sample:
        torch.manual_seed(args.seed)
    with torch.no_grad():
        return model.generate(
            **_to_model(inputs, model), return_dict_in_generate=True, **_generation_kwargs(args), **extra
        )


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


# ---- the commands -------------------------------------------------------------------------------------------------


def _demo(args: argparse.Namespace) -> int:
    import random

    import torch
    from PIL import Image

    from .synthetic import IMAGE_SIZE
    from .synthetic.picture import kept_patches_image, save_png, stack_pictures
    from .synthetic.task import is_correct, make_sample
    from .transformers_compat import cache_from_output

    _check_generation_flags(args)
    if Path(args.save).expanduser().is_dir():
        raise UsageError(f"--save {args.save} is a directory; pass a PNG file path in it")
    sample = make_sample(random.Random(args.seed), IMAGE_SIZE)
    images = [_image_argument(image) for image in args.image] or [sample["image"]]
    question = sample["question"] if args.prompt is None else args.prompt
    folder, processor, config = _open_model(args)
    inputs = _prompt_inputs(processor, config, folder, images, question, args.max_new_tokens)
    pixel_values = inputs["pixel_values"]
    model = _load_weights(folder, args)
    out = _run_generate(model, inputs, args)
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
    if _is_demo_model(folder):
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
    print(summary_line(cache, model.config))
    for number, indices in enumerate(kept, start=1):
        which = f" of image {number}" if len(kept) > 1 else ""
        print(f"kept vision patches{which} (row-major, {grid} x {grid} grid): {indices}")
    print(f"wrote {path} (left: the input; right: dropped patches darkened, kept ones outlined)")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from .transformers_compat import cache_from_output

    _check_generation_flags(args)
    images = [_image_argument(image) for image in args.image]
    folder, processor, config = _open_model(args, announce_default=True)
    inputs = _prompt_inputs(processor, config, folder, images, args.prompt, args.max_new_tokens)
    prompt_tokens = inputs["input_ids"].shape[1]
    model = _load_weights(folder, args)
    out = _run_generate(model, inputs, args)
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
        print(summary_line(cache, model.config))
    return 0


class _Chat:
    """One conversation kept in the model's cache: each turn feeds only its new tokens (and the last answer token)."""

    def __init__(self, model: Any, processor: Any, config: Any, folder: Path, args: argparse.Namespace) -> None:
        self.model, self.processor, self.config, self.folder, self.args = model, processor, config, folder, args
        eos = model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict] = []
        self.ids = None  # the conversation's token ids so far (the last answer's final token not yet fed)
        self.cache = None
        self.closed = True  # whether the last answer ended with an end-of-sequence token
        self.turns = 0
        self.reset_by_error = False  # whether the last turn's failure dropped the conversation

    def turn(self, text: str, images: list[str], stream: bool) -> dict[str, Any]:
        """Answer `text` (with `images`, in order, before it); returns what the turn did (the JSON line)."""
        import torch

        from .transformers_compat import cache_from_output

        processor, model, args = self.processor, self.model, self.args
        tokenizer = processor.tokenizer
        self.reset_by_error = False
        _check_text(processor, text)
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
        messages = self.messages + [{"role": "user", "content": content}]
        whole = processor.apply_chat_template(messages, add_generation_prompt=True)
        if self.ids is None:
            chunk = whole
        else:
            before = processor.apply_chat_template(self.messages)
            if not whole.startswith(before):
                raise RuntimeError("the chat template does not render a conversation as an extension of its start")
            chunk = whole[len(before) :]
            if not self.closed and tokenizer.eos_token and before.endswith(tokenizer.eos_token):
                chunk = tokenizer.eos_token + chunk  # the answer stopped at --max-new-tokens: close it as the template
        inputs = processor(images=images or None, text=chunk, return_tensors="pt", add_special_tokens=self.ids is None)
        ids = inputs["input_ids"] if self.ids is None else torch.cat([self.ids, inputs["input_ids"]], dim=1)
        _check_positions(ids.shape[1], args.max_new_tokens, self.config, "conversation", "/reset starts over")
        _warn_unknown_words(tokenizer, text, self.folder)
        cached = 0 if self.cache is None else self.cache.get_seq_length()
        ids = ids.to(model.device)
        pixel_values = _to_model(inputs, model).get("pixel_values")
        try:
            out = self._generate(ids, cached, pixel_values, stream)
        except Exception:
            had_turns = self.turns > 0
            self.reset()  # the cache may hold part of this turn
            self.reset_by_error = had_turns
            raise
        cache = cache_from_output(out)
        new = out.sequences[0, ids.shape[1] :]
        answer = processor.decode(new, skip_special_tokens=True).strip()
        self.closed = new.numel() > 0 and int(new[-1]) in self.eos_ids
        self.ids = out.sequences.cpu()
        self.messages = messages + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        self.cache = cache
        self.turns += 1
        return {
            "turn": self.turns,
            "prompt": text,
            "images": images,
            "answer": answer,
            "fed_tokens": ids.shape[1] - cached,
            "cache_length_before": cached,
            "cache_length": cache.get_seq_length(),
            "conversation_tokens": out.sequences.shape[1],
            "new_tokens": new.numel(),
            "sparsity": cache.sparsity_report(),
        }

    def _generate(self, ids: Any, cached: int, pixel_values: Any, stream: bool) -> Any:
        """generate() of the conversation `ids` through the cache (its first `cached` tokens are in it)."""
        import torch
        from transformers import TextStreamer

        from .transformers_compat import CACHE_KEY

        model, args = self.model, self.args
        call: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if self.cache is not None:
            call[CACHE_KEY] = self.cache
            if pixel_values is not None:
                # This turn's tokens but the last, with its new images, go through the cache first (transformers
                # 4.57's generate() hands pixel_values to the model only while the cache is empty); generate() then
                # feeds the last one. The same tokens and decisions as feeding the whole turn in generate().
                with torch.no_grad():
                    model(
                        input_ids=ids[:, cached:-1],
                        pixel_values=pixel_values,
                        attention_mask=torch.ones_like(ids[:, :-1]),
                        use_cache=True,
                        logits_to_keep=1,
                        **{CACHE_KEY: self.cache},
                        **_sparsity_kwargs(args),
                    )
        elif pixel_values is not None:
            call["pixel_values"] = pixel_values
        streamer = None
        if stream:
            streamer = TextStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
            print("ASSISTANT: ", end="", flush=True)
        with torch.no_grad():
            return model.generate(**call, return_dict_in_generate=True, streamer=streamer, **_generation_kwargs(args))


def _read_turn(interactive: bool) -> str | None:
    """The next line the user typed (None at EOF): a prompt on a terminal, one line per turn from a pipe."""
    if interactive:
        try:
            return input("USER: ")
        except EOFError:
            print()
            return None
    line = sys.stdin.readline()
    return line if line else None


def _chat(args: argparse.Namespace) -> int:
    import torch

    _check_generation_flags(args)
    if args.num_beams > 1:
        raise UsageError(
            "chat keeps one conversation in the cache: --num-beams is not supported; use greedy or --do-sample"
        )
    first_images = [_readable_image(image) for image in args.image]
    folder, processor, config = _open_model(args, announce_default=True)
    chat = _Chat(_load_weights(folder, args), processor, config, folder, args)
    if args.do_sample:
        torch.manual_seed(args.seed)
    interactive = sys.stdin.isatty()
    print(
        f"[chat] {args.model or folder.name}: one message per line; /image PATH adds an image to the next message, "
        "/reset starts over, /exit or end of input ends",
        file=sys.stderr,
    )
    pending, failures = list(first_images), 0
    while (line := _read_turn(interactive)) is not None:
        line = line.strip()
        if not line:
            continue
        try:
            if line.startswith("/"):
                command, _, rest = line.partition(" ")
                if command in ("/exit", "/quit"):
                    break
                if command == "/reset":
                    chat.reset()
                    pending = list(first_images)
                    print("[chat] the conversation starts over", file=sys.stderr)
                elif command == "/image":
                    pending.append(_readable_image(rest.strip()))
                    print(f"[chat] {rest.strip()} goes with the next message", file=sys.stderr)
                else:
                    raise UsageError(f"unknown command {command}; use /image PATH, /reset or /exit")
                continue
            result = chat.turn(line, pending, stream=not args.json)
        except (UsageError, ValueError, OSError) as error:
            print(f"dynamic-llava chat: error: {_one_line(error)}", file=sys.stderr, flush=True)
            if chat.turns == 0 and chat.reset_by_error:
                print("[chat] the conversation starts over", file=sys.stderr, flush=True)
            if pending and not line.startswith("/"):
                # a failed message takes its images with it: they must not ride along with the next one unasked
                print("[chat] that message's images were dropped; add them again with /image", file=sys.stderr)
                pending = []
            failures += 1
            continue
        pending = []
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            print(
                f"{summary_line(chat.cache, config)}; cache {result['cache_length']:,} tokens, this turn fed "
                f"{result['fed_tokens']:,}",
                flush=True,
            )
    return 2 if failures and not interactive else 0


def _convert(args: argparse.Namespace) -> int:
    from .hub.convert import convert_original_checkpoint

    _check_out_folder("OUT", args.out)
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
    from .hub.loading import check_model_folder

    _check_out_folder("OUT_DIR", args.out_dir)
    check_model_folder(args.model_dir)
    export_model(
        args.model_dir,
        args.out_dir,
        overwrite=args.overwrite,
        max_shard_size=args.max_shard_size,
        dtype=parse_dtype(args.dtype),
    )
    print(f"wrote {args.out_dir}")
    return 0


# bench flags that go to run_bench when its signature has the parameter: flag -> the parameter's names (first found)
def _bench(args: argparse.Namespace) -> int:
    if args.model and args.preset:
        raise UsageError("pass --model or --preset, not both")
    _check_device("--device", args.device, allow_maps=False)
    _check_out_folder("--out", args.out)
    if args.vision_keep_tokens is not None and args.vision_keep_rate is not None:
        raise UsageError("pass --vision-keep-tokens or --vision-keep-rate, not both")
    from .bench.run import format_table, run_bench  # (run_bench warns when --repeats is below 3)

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
        throughput_batches=args.batch_sizes,
        decode_batch=args.decode_batch or None,
        ragged=not args.no_ragged,
        compiled=True if args.compile else None,
        compile_batches=args.compile_batches,
        compile_mode=args.compile_mode,
        memory_budget_gb=args.memory_budget,
        count_steps=args.count_steps,
        vision_keep_tokens=args.vision_keep_tokens,
        vision_keep_rate=args.vision_keep_rate,
        use_vision_predictor=False if args.no_vision_predictor else None,
        use_output_text_predictor=False if args.no_output_text_predictor else None,
        progress=not args.no_progress,
        seed=args.seed,
    )
    print(format_table(results))
    return 0


def _train(args: argparse.Namespace) -> int:
    from .training.trainer import train

    _check_out_folder("--out", args.out)
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
    import torch

    from .synthetic import IMAGE_SIZE
    from .synthetic.evaluate import evaluate_synthetic
    from .synthetic.task import make_sample, prompt_inputs, sample_rng

    if args.task != "synthetic":
        raise UsageError(f"unknown task {args.task!r}; the one task is 'synthetic'")
    _check_generation_flags(args)
    folder, processor, config = _open_model(args)
    # the questions are short and alike: the first one stands for all in the position check
    first = prompt_inputs(processor, [make_sample(sample_rng(args.seed, 0), IMAGE_SIZE)])
    _check_positions(first["input_ids"].shape[1], args.max_new_tokens, config)
    model = _load_weights(folder, args)
    if args.do_sample:
        torch.manual_seed(args.seed)
    sparsity = _sparsity_kwargs(args)
    result = evaluate_synthetic(
        model,
        processor,
        n=args.n,
        seed=args.seed,
        no_sparsity=args.no_sparsity,
        max_new_tokens=args.max_new_tokens,
        vision_keep_tokens=sparsity.get("vision_keep_tokens"),
        vision_keep_rate=sparsity.get("vision_keep_rate"),
        use_vision_predictor=None if args.no_sparsity else sparsity.get("use_vision_predictor"),
        use_output_text_predictor=None if args.no_sparsity else sparsity.get("use_output_text_predictor"),
        generate_kwargs=_sampling_kwargs(args),
        progress=True,
    )
    print(json.dumps(result))
    return 0


def _synthetic_data(args: argparse.Namespace) -> int:

    _check_out_folder("--out", args.out)
    from .synthetic.train import write_synthetic_dataset

    folder = write_synthetic_dataset(args.out, n=args.n, seed=args.seed, overwrite=args.overwrite, progress=True)
    print(f"wrote {args.n} samples: --data {folder / 'data.json'} --images {folder / 'images'}")
    return 0


def _train_synthetic(args: argparse.Namespace) -> int:
    from .synthetic.train import train_synthetic

    _check_out_folder("--out", args.out)
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


def _serve(argv: list[str]) -> int:
    """`dynamic-llava serve ...`: every argument goes to `dynamic_llava.serving.main` (its own flags and --help)."""
    try:
        from .serving import main as serve_main
    except ImportError as error:
        raise UsageError(f"the server is not available in this installation ({error})") from None
    return serve_main(list(argv))


# ---- the parser ---------------------------------------------------------------------------------------------------


def _add_generation_flags(
    parser: argparse.ArgumentParser,
    *,
    images: bool = True,
    prompt: str | None = None,
    question_alias: bool = False,
    prompt_required: bool = False,
    seed_default: int = 0,
    seed_help: str = "seed of the sampling (with --do-sample)",
    json_help: str = "machine-readable output: one JSON object",
) -> None:
    """The flags `demo`, `generate`, `chat` and `evaluate` share (`prompt`: the --prompt help; None: no --prompt)."""
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        metavar="DIR_OR_HUB_ID",
        help="folder or Hub id of a converted/exported Dynamic-LLaVA (default: the embedded demo model, trained on "
        "the synthetic shapes task)",
    )
    model.add_argument(
        "--device",
        "--device-map",
        dest="device_map",
        metavar="DEVICE",
        help='where the model runs: cpu (default), cuda, cuda:N, mps, or an accelerate device map ("auto")',
    )
    model.add_argument("--dtype", default="auto", help="auto (the checkpoint's), float32, float16 or bfloat16")
    quant = model.add_mutually_exclusive_group()
    quant.add_argument(
        "--load-in-4bit", action="store_true", help='bitsandbytes 4-bit (pip install "dynamic-llava[quant]")'
    )
    quant.add_argument(
        "--load-in-8bit", action="store_true", help='bitsandbytes 8-bit (pip install "dynamic-llava[quant]")'
    )

    asked = parser.add_argument_group("prompt and output")
    if images:
        asked.add_argument(
            "--image",
            action="append",
            default=[],
            metavar="PATH_OR_URL",
            help="an image (file or http(s) URL); repeat for several images in one prompt, one <image> each, in order",
        )
    if prompt is not None:
        names = ["--prompt", "--question"] if question_alias else ["--prompt"]
        asked.add_argument(*names, dest="prompt", required=prompt_required, help=prompt)
    asked.add_argument(
        "--max-new-tokens", type=_positive_int, default=DEFAULT_MAX_NEW_TOKENS, help="default %(default)s"
    )
    asked.add_argument("--json", action="store_true", help=json_help)

    sampling = parser.add_argument_group("sampling and beams (default: greedy)")
    sampling.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    sampling.add_argument("--temperature", type=_positive_float, help="with --do-sample")
    sampling.add_argument("--top-k", type=_non_negative_int, help="with --do-sample")
    sampling.add_argument("--top-p", type=_rate, help="with --do-sample")
    sampling.add_argument("--num-beams", type=_positive_int, default=1, help="beam search (default 1: none)")
    sampling.add_argument("--seed", type=int, default=seed_default, help=f"{seed_help} (default %(default)s)")

    sparsity = parser.add_argument_group("sparsity of this call (passed to generate(); the config is not changed)")
    sparsity.add_argument("--vision-keep-tokens", type=_positive_int, metavar="K", help="image tokens kept per image")
    sparsity.add_argument("--vision-keep-rate", type=_rate, metavar="R", help="fraction of each image's tokens kept")
    sparsity.add_argument("--no-vision-predictor", action="store_true", help="keep every image token")
    sparsity.add_argument(
        "--no-output-text-predictor", action="store_true", help="cache every generated token's keys/values"
    )
    sparsity.add_argument("--no-sparsity", action="store_true", help="both predictors off (stock LLaVA compute)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = _Parser(
        prog="dynamic-llava",
        description="Dynamic-LLaVA (ICLR 2025) as a transformers model: run, chat, evaluate, convert, train, bench.",
    )
    parser.add_argument("--version", action=_VersionAction, help="print the installed version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="answer a question with the embedded trained model and draw the kept patches")
    _add_generation_flags(
        demo,
        prompt="the question (default: the synthetic sample's own, whose answer is known)",
        question_alias=True,
        seed_help="which synthetic sample to ask about; also the sampling seed",
        json_help="print one JSON object (answer, kept patches, picture path, sparsity report) instead of text",
    )
    demo.add_argument("--save", default="kept_patches.png", help="PNG path; an existing file is never replaced")
    demo.set_defaults(func=_demo, prompt_flag="--prompt/--question")

    gen = sub.add_parser("generate", help="answer a prompt (about images) and print what was kept")
    _add_generation_flags(gen, prompt="what to ask", prompt_required=True)
    gen.set_defaults(func=_generate)

    chat = sub.add_parser(
        "chat",
        help="a conversation kept in the model's cache (stdin: one message per line; /image PATH, /reset, /exit)",
        description="Chat with a model: each line you type is one message; the answer streams as it is generated, "
        "then its sparsity line. The conversation stays in the model's cache: each turn feeds only its new tokens. "
        "/image PATH adds an image to the next message, /reset starts over (with the --image images again), "
        "/exit or end of input ends. Reads a terminal or a pipe.",
    )
    _add_generation_flags(chat, json_help="print one JSON line per turn (no streaming)")
    chat.set_defaults(func=_chat)

    ev = sub.add_parser("evaluate", help="answer N fresh synthetic questions; print one JSON line")
    ev.add_argument("--task", default="synthetic", help="the one task: synthetic")
    ev.add_argument("--n", type=_positive_int, default=500, help="questions (default %(default)s)")
    _add_generation_flags(
        ev,
        images=False,
        seed_default=12345,
        seed_help="which questions (the synthetic stream); also the sampling seed",
        json_help="the output is always one JSON object (accepted for the shared flag set)",
    )
    ev.set_defaults(func=_evaluate)

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
    bench.add_argument("--batch-size", type=_positive_int, default=1)
    bench.add_argument(
        "--batch-sizes", type=_int_list, metavar="B1,B2,...", help="batch sizes of the tokens/s runs (e.g. 1,8,32)"
    )
    bench.add_argument("--new-tokens", type=_positive_int, default=512)
    bench.add_argument(
        "--throughput-tokens", type=_positive_int, default=64, help="new tokens of the batch-1/8 throughput runs"
    )
    bench.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    bench.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    bench.add_argument("--repeats", type=_positive_int, default=3, help="timed runs per measure (median; default 3)")
    bench.add_argument(
        "--memory-budget",
        type=_positive_float,
        metavar="GB",
        help="find the largest batch whose memory footprint fits in GB, ours and stock",
    )
    bench.add_argument(
        "--compile", action="store_true", help="also run both models compiled, with static caches (default: CUDA only)"
    )
    bench.add_argument("--vision-keep-tokens", type=_positive_int, metavar="K", help="image tokens kept per image")
    bench.add_argument("--vision-keep-rate", type=_rate, metavar="R", help="fraction of each image's tokens kept")
    bench.add_argument("--no-output-text-predictor", action="store_true", help="cache every generated token")
    bench.add_argument("--no-vision-predictor", action="store_true", help="keep every image token")
    bench.add_argument(
        "--decode-batch",
        type=int,
        default=8,
        help="batch of the second decode run over --new-tokens (ragged rows); 0: none",
    )
    bench.add_argument(
        "--no-ragged",
        action="store_true",
        help="batch rows of one prompt length (default: left-padded rows of different lengths)",
    )
    bench.add_argument(
        "--compile-batches",
        type=_int_list,
        metavar="B1,B2,...",
        help="batch sizes of the compiled tokens/s runs (default: --batch-sizes on CUDA, none on CPU)",
    )
    bench.add_argument(
        "--compile-mode", help="torch.compile mode (default: reduce-overhead on CUDA, default elsewhere)"
    )
    bench.add_argument(
        "--count-steps",
        type=int,
        default=64,
        help="decode steps over which aten ops and host syncs per step are counted (0: skip)",
    )
    bench.add_argument("--seed", type=int, default=0, help="seed of weights, inputs and sampling")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    bench.add_argument("--out", default=None, help="folder for results.json and the plots")
    bench.set_defaults(func=_bench)

    tr = sub.add_parser("train", help="train the predictors under the stock Trainer on LLaVA conversation JSON")
    tr.add_argument("--data", required=True, help="LLaVA conversation JSON")
    tr.add_argument("--images", required=True, help="folder of the samples' images")
    tr.add_argument("--model", required=True, help="a Dynamic-LLaVA folder with its processor (convert/export)")
    tr.add_argument("--out", required=True, help="checkpoints go to OUT/checkpoints, the model to OUT/model")
    tr.add_argument("--epochs", type=_positive_float, default=1.0)
    tr.add_argument("--max-steps", type=int, default=-1)
    tr.add_argument("--batch-size", type=_positive_int, default=4)
    tr.add_argument("--grad-accum", type=_positive_int, default=1)
    tr.add_argument("--predictor-lr", type=_positive_float, default=2e-4)
    tr.add_argument("--lr", type=_positive_float, default=5e-6)
    tr.add_argument("--unfreeze-vision-tower", action="store_true")
    tr.add_argument("--freeze-projector", action="store_true")
    tr.add_argument("--freeze-llm", action="store_true")
    tr.add_argument("--save-steps", type=_positive_int, default=500)
    tr.add_argument("--logging-steps", type=_positive_int, default=10)
    tr.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUT/checkpoints")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--max-length", type=_positive_int, default=2048)
    tr.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp16"),
        default="fp32",
        help="bf16/fp16: mixed-precision autocast on a GPU (weights stay fp32)",
    )
    tr.set_defaults(func=_train)

    ts = sub.add_parser("train-synthetic", help="train a small Dynamic-LLaVA from scratch on the synthetic task")
    ts.add_argument("--out", required=True)
    ts.add_argument(
        "--vision-steps", type=_non_negative_int, default=4000, help="phase 0: the vision tower alone (batch 32)"
    )
    ts.add_argument(
        "--dense-steps", type=_non_negative_int, default=3000, help="phase 1: LM and projector, sparsification off"
    )
    ts.add_argument(
        "--sparse-steps", type=_non_negative_int, default=2000, help="phase 2: the predictors (Gumbel masks)"
    )
    ts.add_argument(
        "--calibration-samples",
        type=_positive_int,
        default=100,
        help="phase 3: prompts whose greedy answers set the output-text threshold",
    )
    ts.add_argument("--batch-size", type=_positive_int, default=16)
    ts.add_argument("--seed", type=int, default=0)
    ts.set_defaults(func=_train_synthetic)

    sd = sub.add_parser("synthetic-data", help="write synthetic samples as LLaVA conversation JSON and PNGs for train")
    sd.add_argument("--out", required=True, help="a new folder: OUT/data.json and OUT/images/")
    sd.add_argument("--n", type=_positive_int, default=1000)
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

    # every argument after `serve` goes to dynamic_llava.serving.main (it parses its own flags, --help included)
    sub.add_parser("serve", add_help=False, help="an OpenAI-compatible server (`dynamic-llava serve --help`)")
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


def _one_line(error: BaseException) -> str:
    """An error's message on one line (a multi-line message joined; the type's name if it has none)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines) if lines else type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command in `argv` (default: the process arguments); returns the exit code (2 on a usage error)."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "serve":
        command, run = "serve", lambda: _serve(rest)
    else:
        if rest:
            prog = f"dynamic-llava {args.command}"
            parser.exit(2, f"{prog}: error: unrecognized arguments: {' '.join(rest)} (see `{prog} --help`)\n")
        command, run = args.command, lambda: args.func(args)
    try:
        with _library_logging():
            return run()
    except (UsageError, ValueError, TypeError, OSError, ImportError) as error:
        print(f"dynamic-llava {command}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dynamic-llava {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
