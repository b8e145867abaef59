"""`dynamic-llava bench`: ours vs the stock model of its base on the same weights (`dynamic_llava.bench.run.run_bench`).

`add_bench_flags` and `run_bench_kwargs` are the bench's flags and their `run_bench` keywords, for this command and
for any other front-end of the bench; the sparsity flags are the shared group (`flags.add_sparsity_flags`).
"""

from __future__ import annotations

import argparse
from collections.abc import Collection
from typing import Any

from ..bench.presets import DEFAULT_PRESET, PRESETS
from ..sparsity_options import sparsity_options
from . import common
from .common import UsageError
from .flags import add_sparsity_flags, flag_spelling, int_list, non_negative_int, positive_float, positive_int

__all__ = ["add_bench_flags", "add_parser", "run", "run_bench_kwargs"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bench", help="measure ours vs its base's stock model on the same weights (ratios, one run)"
    )
    add_bench_flags(parser)
    parser.set_defaults(run=run)
    return parser


def add_bench_flags(parser: argparse.ArgumentParser) -> None:
    """Every flag of the bench (what runs, the measures, ours' sparsity per call)."""
    parser.add_argument("--model", help="a Dynamic-LLaVA folder of any base (default: a random model of --preset)")
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), help=f"a random model of these shapes (default {DEFAULT_PRESET})"
    )
    parser.add_argument("--batch-size", type=positive_int, default=1)
    parser.add_argument(
        "--batch-sizes", type=int_list, metavar="B1,B2,...", help="batch sizes of the tokens/s runs (e.g. 1,8,32)"
    )
    parser.add_argument("--new-tokens", type=positive_int, default=512)
    parser.add_argument(
        "--throughput-tokens", type=positive_int, default=64, help="new tokens of the batch-1/8 throughput runs"
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed runs per measure (median; default 3)")
    parser.add_argument(
        "--memory-budget",
        type=positive_float,
        metavar="GB",
        help="find the largest batch whose memory footprint fits in GB, ours and stock",
    )
    parser.add_argument(
        "--compile", action="store_true", help="also run both models compiled, with static caches (default: CUDA only)"
    )
    parser.add_argument(
        "--decode-batch",
        type=int,
        default=8,
        help="batch of the second decode run over --new-tokens (ragged rows); 0: none",
    )
    parser.add_argument(
        "--no-ragged",
        action="store_true",
        help="batch rows of one prompt length (default: left-padded rows of different lengths)",
    )
    parser.add_argument(
        "--compile-batches",
        type=int_list,
        metavar="B1,B2,...",
        help="batch sizes of the compiled tokens/s runs (default: --batch-sizes on CUDA, none on CPU)",
    )
    parser.add_argument(
        "--compile-mode", help="torch.compile mode (default: reduce-overhead on CUDA, default elsewhere)"
    )
    parser.add_argument(
        "--count-steps",
        type=int,
        default=64,
        help="decode steps over which aten ops and host syncs per step are counted (0: skip)",
    )
    parser.add_argument(
        "--long-tokens",
        type=int_list,
        metavar="K1,K2,...",
        help="lengths of the long generations (decode time, cache bytes; default 512,1024 on CPU, 1024,2048 on CUDA)",
    )
    parser.add_argument("--no-long", action="store_true", help="skip the long generations")
    parser.add_argument(
        "--long-batches",
        type=int_list,
        default=[1],
        metavar="B1,B2,...",
        help="batch sizes of the long generations (default 1; ragged rows unless --no-ragged)",
    )
    parser.add_argument(
        "--nocache-tokens",
        type=non_negative_int,
        default=8,
        help="new tokens of the use_cache=False decode timing (0 or 1: skip; default 8)",
    )
    parser.add_argument(
        "--budget-tokens",
        type=positive_int,
        metavar="N",
        help="new tokens of each --memory-budget probe (default --new-tokens)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, inputs and sampling")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--out", default=None, help="folder for results.json and the plots")
    add_sparsity_flags(parser, "sparsity of ours (passed to generate() per call; the config is not changed)")


def run_bench_kwargs(args: argparse.Namespace, accepted: Collection[str]) -> dict[str, Any]:
    """
    The `run_bench` keywords of the parsed bench flags, checked before anything loads. `accepted`: `run_bench`'s
    parameter names; a per-call sparsity field it takes gets its value or None (the config's), and one asked for
    that it does not take is refused (it cannot be measured, so it is not ignored).
    """
    if args.model and args.preset:
        raise UsageError("pass --model or --preset, not both")
    common.check_device("--device", args.device, allow_maps=False)
    common.check_out_folder("--out", args.out)
    sparsity = common.sparsity_kwargs(args)
    for field, value in sparsity.items():
        if field not in accepted:
            raise UsageError(f"{flag_spelling(field, value)}: the bench cannot run it (run_bench takes no {field})")
    kwargs: dict[str, Any] = dict(
        model=args.model,
        preset=args.preset or DEFAULT_PRESET,
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
        long_tokens=() if args.no_long else args.long_tokens,
        long_batches=args.long_batches,
        nocache_tokens=args.nocache_tokens,
        budget_tokens=args.budget_tokens,
        progress=not args.no_progress,
        seed=args.seed,
    )
    for option in sparsity_options():
        if option.field in accepted:
            kwargs[option.field] = sparsity.get(option.field)
    return kwargs


def run(args: argparse.Namespace) -> int:
    import inspect

    from ..bench import run as bench_run  # (run_bench warns when --repeats is below 3)

    kwargs = run_bench_kwargs(args, inspect.signature(bench_run.run_bench).parameters)
    print(bench_run.format_table(bench_run.run_bench(**kwargs)))
    return 0
