"""Configuration of Dynamic-LLaVA on LLaVA-NeXT: a `LlavaNextConfig` plus the sparsification fields.

Every field of the stock `LlavaNextConfig` keeps its meaning; the sparsification fields are those of every Dynamic
config (`sparse_settings.SparsityConfigMixin`), checked however they are set. An image becomes a number of tokens
that depends on its size (anyres tiles, plus one newline token per row of patches), so `vision_keep_tokens` is
checked against each image when it comes.

This file is a Hub remote-code module.
"""

from __future__ import annotations

from typing import Any

from transformers import LlavaNextConfig

from .sparse_settings import SPARSITY_CONFIG_DOC, SparsityConfigMixin

__all__ = ["DynamicLlavaNextConfig"]


class DynamicLlavaNextConfig(SparsityConfigMixin, LlavaNextConfig):
    model_type = "dynamic_llava_next"

    def __init__(self, **kwargs: Any):
        self._set_sparsity_fields(kwargs)
        super().__init__(**kwargs)
        self.validate_sparsity()


DynamicLlavaNextConfig.__doc__ = (
    "Configuration of [`DynamicLlavaNextForConditionalGeneration`]: a `LlavaNextConfig` plus the sparsity fields.\n\n"
    "    Args (besides those of `LlavaNextConfig`):" + SPARSITY_CONFIG_DOC
)
