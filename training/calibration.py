"""The output-text threshold calibration: a production step of synthetic training (`dynamic-llava train-synthetic`,
phase 3) and of the bench (random weights keep all or nothing otherwise)."""

from __future__ import annotations

from typing import Any

import torch

from ..modeling_dynamic_llava import DynamicLlavaForConditionalGeneration
from ..sparse_cache import cache_from_output

__all__ = ["calibrate_output_text_bias"]


def calibrate_output_text_bias(
    model: DynamicLlavaForConditionalGeneration,
    inputs: dict[str, torch.Tensor],
    max_new_tokens: int = 30,
    rounds: int = 3,
    seed: int | None = None,
    keep_rate: float = 0.5,
    **generate_kwargs: Any,
) -> float:
    """
    Shift the last bias of the output-text predictor so that a `keep_rate` share of the generated tokens is kept
    (the margin `logit0 - logit1` at that quantile -> 0). Random weights otherwise keep all or none; a trained
    predictor keeps more than its training rate at inference, where the Gumbel coin flips of the tokens it is
    indifferent about become a fixed threshold. Each round generates from `inputs` with `generate_kwargs` (greedy by
    default; `seed` reseeds torch before each run, for sampling). Returns the keep rate of a final run.
    """
    if not 0.0 < keep_rate < 1.0:
        raise ValueError(f"keep_rate must be in (0, 1), got {keep_rate}")
    generate_kwargs.setdefault("do_sample", False)
    head = model.output_text_score_predictor.output_mlp[-1]

    def run(**extra):
        if seed is not None:
            torch.manual_seed(seed)
        return model.generate(**inputs, max_new_tokens=max_new_tokens, **generate_kwargs, **extra)

    for _ in range(rounds):
        margins = []
        hook = head.register_forward_hook(
            lambda mod, args, out, margins=margins: margins.append((out[..., 0] - out[..., 1]).flatten().float())
        )
        try:
            run()
        finally:
            hook.remove()
        # shift to the midpoint of the two margins around the quantile: a keep_rate share kept, and no margin
        # left at the threshold itself (a decision at margin ~0 would flip with float noise)
        ordered = torch.cat(margins).sort().values
        middle = min(max(1, int(ordered.numel() * (1.0 - keep_rate))), ordered.numel() - 1)
        shift = (ordered[middle - 1] + ordered[middle]) / 2 if ordered.numel() > 1 else ordered[0]
        with torch.no_grad():
            head.bias[0] -= (shift / 2).to(head.bias.dtype)
            head.bias[1] += (shift / 2).to(head.bias.dtype)
    cache = cache_from_output(run(return_dict_in_generate=True))
    keep = torch.cat(cache.output_text_keep)
    return float(keep.float().mean())
