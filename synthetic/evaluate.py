"""`dynamic-llava evaluate --task synthetic`: fresh questions of the synthetic shapes task, greedy answers, and what
the model kept: accuracy, vision and output-text keep rates, and how many of the object's patches were kept."""

from __future__ import annotations

from typing import Any

import torch
from transformers.utils import logging

from ..modeling_dynamic_llava import DynamicLlavaForConditionalGeneration
from ..processor import DynamicLlavaProcessor
from ..sparse_cache import DynamicLlavaCache, cache_from_output
from ..sparsity_options import sparsity_request
from . import IMAGE_SIZE, PATCH
from .bases import TOKENS_PER_IMAGE, synthetic_base
from .task import is_correct, make_sample, object_patches, prompt_inputs, sample_rng

__all__ = ["evaluate_synthetic", "first_image_kept"]


def first_image_kept(cache: DynamicLlavaCache, row: int) -> list[int]:
    """The kept patch indices of row `row`'s first image."""
    images = cache.kept_vision_indices[row]  # one LongTensor per image of the row
    return images[0].tolist() if images else []


def _check_count(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer (at least 1), got {value!r}")


def evaluate_synthetic(
    model: DynamicLlavaForConditionalGeneration,
    processor: DynamicLlavaProcessor,
    n: int = 500,
    seed: int = 12345,
    no_sparsity: bool = False,
    max_new_tokens: int = 64,
    batch_size: int = 25,
    generate_kwargs: dict[str, Any] | None = None,
    progress: bool = False,
    **sparsity: Any,
) -> dict[str, Any]:
    """
    Fresh questions from `seed`; greedy answers; one dict of accuracy, keep rates and object patch recall.

    The sparsity of the run is passed to each `generate()` call (the model's config is not changed): `**sparsity`
    are the per-call fields of `sparse_settings.SparsityKwargs` (`vision_keep_tokens`, `vision_keep_rate`,
    `use_vision_predictor`, ...; None: the config's); `no_sparsity` is `SPARSITY_OFF`; the rules of
    `sparsity_options.sparsity_request` apply. `generate_kwargs` go to `generate()` as well (sampling, beams).
    `progress`: a progress bar (tqdm, to stderr) over the questions.
    """
    _check_count("n (the number of questions)", n)
    _check_count("batch_size", batch_size)
    _check_count("max_new_tokens", max_new_tokens)
    sparsity = sparsity_request(sparsity, no_sparsity)
    # validated up front, as generate() would (one clear ValueError before any question runs)
    settings = model.config.sparsity_settings(**sparsity)
    kwargs = {"do_sample": False, **(generate_kwargs or {}), **sparsity}
    image = synthetic_base(model.config.model_type).image_placeholder
    tokenizer = processor.tokenizer
    correct = kept_text = scored_text = covered = object_total = kept_vision = vision_total = 0
    bar = logging.tqdm(total=n, unit="question", desc="evaluate", disable=not progress, leave=False)
    try:
        for first in range(0, n, batch_size):
            samples = [make_sample(sample_rng(seed, i), IMAGE_SIZE) for i in range(first, min(n, first + batch_size))]
            inputs = prompt_inputs(processor, samples, image=image).to(model.device)
            if torch.is_floating_point(inputs["pixel_values"]):
                inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=max_new_tokens, return_dict_in_generate=True, **kwargs)
            cache = cache_from_output(out)
            texts = tokenizer.batch_decode(out.sequences[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            for row, (sample, text) in enumerate(zip(samples, texts, strict=True)):
                correct += is_correct(text, sample)
                kept = set(first_image_kept(cache, row))
                patches = object_patches(sample["object_box"], IMAGE_SIZE, PATCH)
                covered += len(kept & set(patches))
                object_total += len(patches)
                kept_vision += len(kept)
                vision_total += TOKENS_PER_IMAGE
                decisions = cache.output_text_keep[row]
                kept_text += int(decisions.sum())
                scored_text += decisions.numel()
            bar.update(len(samples))
    finally:
        bar.close()
    return {
        "task": "synthetic",
        "n": n,
        "seed": seed,
        "sparsity": settings.enabled,
        "settings": sparsity,
        "accuracy": correct / n,
        "correct": correct,
        "vision_keep_rate": kept_vision / vision_total,
        "output_text_keep_rate": (kept_text / scored_text) if scored_text else None,
        "output_text_scored": scored_text,
        "object_patch_recall": covered / object_total,
        "object_patches": object_total,
    }
