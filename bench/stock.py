"""The stock transformers LLaVA on the same weights as a Dynamic-LLaVA model (bench, evaluation with sparsity off,
tests)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from ..modeling_dynamic_llava import DynamicLlavaForConditionalGeneration


def stock_llava(model: DynamicLlavaForConditionalGeneration) -> LlavaForConditionalGeneration:
    """`LlavaForConditionalGeneration` with `model`'s weights (predictors left out), dtype and attention."""
    config_dict = model.config.to_dict()
    for key in ("model_type", "architectures", "auto_map"):
        config_dict.pop(key, None)
    config = LlavaConfig(**config_dict)
    impl = model.config.text_config._attn_implementation
    for sub in (config, config.text_config, config.vision_config):
        sub._attn_implementation = impl
    with torch.device(model.device):  # built where the weights are (a 7B model on a GPU is not built on the CPU)
        stock = LlavaForConditionalGeneration(config).to(model.dtype).eval()
    state = {k: v for k, v in model.state_dict().items() if "score_predictor" not in k}
    stock.load_state_dict(state, strict=True)
    stock.generation_config = model.generation_config
    return stock


@contextlib.contextmanager
def sparsity_disabled(
    model: DynamicLlavaForConditionalGeneration,
) -> Iterator[DynamicLlavaForConditionalGeneration]:
    """Both predictors off for the duration (the same weights, stock compute)."""
    saved = model.config.use_vision_predictor, model.config.use_output_text_predictor
    model.config.use_vision_predictor = model.config.use_output_text_predictor = False
    try:
        yield model
    finally:
        model.config.use_vision_predictor, model.config.use_output_text_predictor = saved
