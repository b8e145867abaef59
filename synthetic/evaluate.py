"""`dynamic-llava evaluate --task synthetic`: fresh questions of the synthetic shapes task, greedy answers, and what
the model kept: accuracy, vision and output-text keep rates, and how many of the object's patches were kept."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from ..bench.stock import sparsity_disabled
from ..modeling_dynamic_llava import DynamicLlavaForConditionalGeneration
from ..processor import DynamicLlavaProcessor
from ..sparse_cache import DynamicLlavaCache, cache_from_output
from . import IMAGE_SIZE, PATCH
from .task import is_correct, make_sample, object_patches, prompt_inputs, sample_rng

__all__ = ["evaluate_synthetic", "first_image_kept"]


def first_image_kept(cache: DynamicLlavaCache, row: int) -> list[int]:
    """The kept patch indices of row `row`'s first image."""
    images = cache.kept_vision_indices[row]  # one LongTensor per image of the row
    return images[0].tolist() if images else []


def evaluate_synthetic(
    model: DynamicLlavaForConditionalGeneration,
    processor: DynamicLlavaProcessor,
    n: int = 500,
    seed: int = 12345,
    no_sparsity: bool = False,
    max_new_tokens: int = 64,
    batch_size: int = 25,
) -> dict[str, Any]:
    """Fresh questions from `seed`; greedy answers; one dict of accuracy, keep rates and object patch recall."""
    config = model.config
    tokenizer = processor.tokenizer
    correct = kept_text = scored_text = covered = object_total = kept_vision = vision_total = 0
    with sparsity_disabled(model) if no_sparsity else contextlib.nullcontext():
        for first in range(0, n, batch_size):
            samples = [make_sample(sample_rng(seed, i), IMAGE_SIZE) for i in range(first, min(n, first + batch_size))]
            inputs = prompt_inputs(processor, samples)
            with torch.no_grad():
                out = model.generate(
                    **inputs, max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True
                )
            cache = cache_from_output(out)
            texts = tokenizer.batch_decode(out.sequences[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            for row, (sample, text) in enumerate(zip(samples, texts, strict=True)):
                correct += is_correct(text, sample)
                kept = set(first_image_kept(cache, row))
                patches = object_patches(sample["object_box"], IMAGE_SIZE, PATCH)
                covered += len(kept & set(patches))
                object_total += len(patches)
                kept_vision += len(kept)
                vision_total += config.image_seq_length
                decisions = cache.output_text_keep[row]
                kept_text += int(decisions.sum())
                scored_text += decisions.numel()
    return {
        "task": "synthetic",
        "n": n,
        "seed": seed,
        "sparsity": not no_sparsity,
        "accuracy": correct / n,
        "correct": correct,
        "vision_keep_rate": kept_vision / vision_total,
        "output_text_keep_rate": (kept_text / scored_text) if scored_text else None,
        "output_text_scored": scored_text,
        "object_patch_recall": covered / object_total,
        "object_patches": object_total,
    }
