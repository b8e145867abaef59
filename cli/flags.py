"""The flags the commands share, as argparse groups, and the argument types behind them.

- `add_model_flags`: the model, where it runs, its dtype and quantization;
- `add_prompt_flags`: images, the prompt, `--max-new-tokens`, `--json`;
- `add_sampling_flags`: greedy / sampling / beams and the seed;
- `add_sparsity_flags`: the per-call sparsity, one flag per field of `sparse_settings.SparsityKwargs` (derived by
  `sparsity_options`: a field added there is a flag here, with its help and its check) and `--no-sparsity`
  (`SPARSITY_OFF`);
- `add_generation_flags`: the four together, the flag set of `demo`, `generate`, `chat` and `evaluate`.

A bad value is one line from `Parser.error` (exit code 2). Nothing here imports torch or transformers.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from typing import Any

from ..sparsity_options import NO_SPARSITY, SparsityOption, no_sparsity_help, sparsity_options

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "Parser",
    "VersionAction",
    "add_generation_flags",
    "add_model_flags",
    "add_prompt_flags",
    "add_sampling_flags",
    "add_sparsity_flags",
    "flag_spelling",
    "int_list",
    "non_negative_int",
    "package_version",
    "positive_float",
    "positive_int",
    "rate",
]

# The one default of `demo`, `generate`, `chat` and `evaluate` (the README's quickstart and evaluation use 64 too).
DEFAULT_MAX_NEW_TOKENS = 64


# ---- the parser ----------------------------------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line on stderr (exit code 2); its subcommands' parsers are Parsers too."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


class VersionAction(argparse.Action):
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


# ---- argument types ------------------------------------------------------------------------------------------------


def whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def positive_int(text: str) -> int:
    value = whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = whole_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def rate(text: str) -> float:
    value = number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], e.g. 0.2; got {text}")
    return value


def int_list(text: str) -> list[int]:
    parts = [part.strip() for part in text.split(",")]
    if not all(parts):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of whole numbers such as 1,8; got {text!r}")
    return [positive_int(part) for part in parts]


def _option_type(option: SparsityOption):
    """The argparse type of a sparsity option: its text parsed and checked by the declaration."""

    def parse(text: str) -> Any:
        try:
            return option.parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parse.__name__ = option.field
    return parse


# ---- the shared groups ---------------------------------------------------------------------------------------------


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """--model, --device / --device-map, --dtype, --load-in-4bit / --load-in-8bit."""
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
    quant.add_argument("--load-in-4bit", action="store_true", help='bitsandbytes 4-bit (pip install -e ".[quant]")')
    quant.add_argument("--load-in-8bit", action="store_true", help='bitsandbytes 8-bit (pip install -e ".[quant]")')


def add_prompt_flags(
    parser: argparse.ArgumentParser,
    *,
    images: bool = True,
    prompt: str | None = None,
    question_alias: bool = False,
    prompt_required: bool = False,
    json_help: str = "machine-readable output: one JSON object",
) -> None:
    """--image (repeatable), --prompt (`prompt`: its help; None: no --prompt), --max-new-tokens, --json."""
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
        "--max-new-tokens", type=positive_int, default=DEFAULT_MAX_NEW_TOKENS, help="default %(default)s"
    )
    asked.add_argument("--json", action="store_true", help=json_help)


def add_sampling_flags(
    parser: argparse.ArgumentParser,
    *,
    seed_default: int = 0,
    seed_help: str = "seed of the sampling (with --do-sample)",
) -> None:
    """--do-sample, --temperature, --top-k, --top-p, --num-beams, --seed."""
    sampling = parser.add_argument_group("sampling and beams (default: greedy)")
    sampling.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    sampling.add_argument("--temperature", type=positive_float, help="with --do-sample")
    sampling.add_argument("--top-k", type=non_negative_int, help="with --do-sample")
    sampling.add_argument("--top-p", type=rate, help="with --do-sample")
    sampling.add_argument("--num-beams", type=positive_int, default=1, help="beam search (default 1: none)")
    sampling.add_argument("--seed", type=int, default=seed_default, help=f"{seed_help} (default %(default)s)")


def add_sparsity_flags(
    parser: argparse.ArgumentParser,
    title: str = "sparsity of this call (passed to generate(); the config is not changed)",
) -> None:
    """
    One flag per per-call field (`sparsity_options()`): `--vision-keep-tokens TOKENS`, `--vision-keep-rate RATE`,
    `--[no-]vision-predictor`, `--[no-]output-text-predictor`, `--image-scorer SCORER`, ...; each stored under the
    field's name (None: not given, the config decides). And `--no-sparsity` (stored as `no_sparsity`).
    """
    group = parser.add_argument_group(title)
    for option in sparsity_options():
        if option.kind is bool:
            group.add_argument(
                option.flag,
                dest=option.field,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"{option.help}: on / off (default: the model's config)",
            )
        else:
            group.add_argument(
                option.flag, dest=option.field, type=_option_type(option), metavar=option.metavar, help=option.help
            )
    group.add_argument("--no-sparsity", dest=NO_SPARSITY, action="store_true", help=no_sparsity_help())


def flag_spelling(field: str, value: Any) -> str:
    """How the messages of `sparsity_request` name what was typed: `--vision-keep-rate 0.5`, `--no-sparsity`, ..."""
    if field == NO_SPARSITY:
        return "--no-sparsity"
    option = next(option for option in sparsity_options() if option.field == field)
    if option.kind is bool:
        return option.flag if value else option.negative_flag
    return f"{option.flag} {value}"


def add_generation_flags(
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
    """The flags `demo`, `generate`, `chat` and `evaluate` share: the four groups above."""
    add_model_flags(parser)
    add_prompt_flags(
        parser,
        images=images,
        prompt=prompt,
        question_alias=question_alias,
        prompt_required=prompt_required,
        json_help=json_help,
    )
    add_sampling_flags(parser, seed_default=seed_default, seed_help=seed_help)
    add_sparsity_flags(parser)
