"""Test helpers: the cache of a generate() result, and stock LLaVA on the same weights."""

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration


def cache_of(generate_output):
    """The cache returned by `generate(..., return_dict_in_generate=True)` (`cache` in 5.x, `past_key_values` 4.x)."""
    for key in ("cache", "past_key_values"):
        if key in generate_output and generate_output[key] is not None:
            return generate_output[key]
    raise AssertionError("generate() returned no cache")


def stock_llava(model):
    """`LlavaForConditionalGeneration` with the same weights as `model` (predictors left out)."""
    config_dict = model.config.to_dict()
    for key in ("model_type", "architectures", "auto_map"):
        config_dict.pop(key, None)
    config = LlavaConfig(**config_dict)
    impl = model.config.text_config._attn_implementation
    config._attn_implementation = impl
    config.text_config._attn_implementation = impl
    config.vision_config._attn_implementation = impl
    stock = LlavaForConditionalGeneration(config).eval()
    state = {k: v for k, v in model.state_dict().items() if "score_predictor" not in k}
    stock.load_state_dict(state, strict=True)
    stock.generation_config.suppress_tokens = list(model.generation_config.suppress_tokens)
    stock.generation_config.pad_token_id = 0
    return stock.to(model.dtype)
