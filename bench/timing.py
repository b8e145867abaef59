"""Timing of the bench: medians of wall times (CUDA work waited for), the clock's resolution, one sampled
`generate()` of exactly N tokens, and generate()'s compile settings."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["CLOCK_RESOLUTION_S", "compile_config", "generate", "median_time", "wall_time"]

# the smallest difference `time.perf_counter` can tell apart: a timing at or below it is not a measure
CLOCK_RESOLUTION_S = time.get_clock_info("perf_counter").resolution


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def wall_time(fn: Callable[[], Any]) -> tuple[Any, float]:
    """`fn()` and its wall time in seconds (CUDA work waited for, so queued kernels are counted)."""
    _synchronize()
    start = time.perf_counter()
    result = fn()
    _synchronize()
    return result, time.perf_counter() - start


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time of `fn` over `repeats` calls, in seconds."""
    return statistics.median(wall_time(fn)[1] for _ in range(repeats))


def generate(model: torch.nn.Module, inputs: dict[str, torch.Tensor], new_tokens: int, **kwargs: Any) -> Any:
    """Sample exactly `new_tokens` tokens (no EOS stop), returning the generate output with the cache.

    `inputs`: `input_ids` / `attention_mask` `[batch, prompt]`, `pixel_values` `[batch, 3, side, side]`."""
    return model.generate(
        **inputs,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=True,
        top_k=0,
        return_dict_in_generate=True,
        **kwargs,
    )


def compile_config(device: str, mode: str | None = None) -> Any:
    """generate()'s compile settings for the compiled runs: dynamic=False, transformers' default mode on CUDA
    (reduce-overhead), inductor's default elsewhere, where generate() only compiles with `_compile_all_devices`."""
    from transformers.generation import CompileConfig

    cuda = torch.device(device).type == "cuda"
    config = CompileConfig(fullgraph=False, dynamic=False, mode=mode or ("reduce-overhead" if cuda else "default"))
    if not cuda:
        config._compile_all_devices = True
    return config
