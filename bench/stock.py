"""The stock transformers model on the same weights as a Dynamic model of any base (bench, evaluation with sparsity
off, tests): `LlavaForConditionalGeneration`, `LlavaNextForConditionalGeneration` or
`Qwen2_5_VLForConditionalGeneration`, the stock class the Dynamic one subclasses."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedModel

__all__ = ["sparsity_disabled", "stock_class", "stock_llava", "stock_model"]


def stock_class(cls: type, kind: type) -> type:
    """The stock transformers class a Dynamic class subclasses (the first `kind` of `transformers.models` in its
    MRO): `DynamicLlavaNextConfig` -> `LlavaNextConfig`, `DynamicQwen2_5_VLForConditionalGeneration` ->
    `Qwen2_5_VLForConditionalGeneration`."""
    for parent in cls.__mro__:
        if parent.__module__.startswith("transformers.models.") and issubclass(parent, kind):
            return parent
    raise TypeError(f"{cls.__name__} subclasses no stock transformers {kind.__name__}: pass a Dynamic-LLaVA model.")


def stock_model(model: Any) -> PreTrainedModel:
    """The stock model of `model`'s base with `model`'s weights (predictors left out, loaded strictly), dtype,
    attention implementation and generation config."""
    config_dict = model.config.to_dict()
    for key in ("model_type", "architectures", "auto_map"):
        config_dict.pop(key, None)
    config = stock_class(type(model.config), PretrainedConfig)(**config_dict)
    impl = model.config.text_config._attn_implementation
    for sub in (config, config.text_config, config.vision_config):
        sub._attn_implementation = impl
    with torch.device(model.device):  # built where the weights are (a 7B model on a GPU is not built on the CPU)
        stock = stock_class(type(model), PreTrainedModel)(config).to(model.dtype).eval()
    state = {k: v for k, v in model.state_dict().items() if "score_predictor" not in k}
    stock.load_state_dict(state, strict=True)
    stock.generation_config = model.generation_config
    return stock


stock_llava = stock_model  # (its name from when LLaVA-1.5 was the only base)


@contextlib.contextmanager
def sparsity_disabled(model: Any) -> Iterator[Any]:
    """Both predictors off for the duration (the same weights, stock compute)."""
    saved = model.config.use_vision_predictor, model.config.use_output_text_predictor
    model.config.use_vision_predictor = model.config.use_output_text_predictor = False
    try:
        yield model
    finally:
        model.config.use_vision_predictor, model.config.use_output_text_predictor = saved
