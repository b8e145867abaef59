"""Configuration of Dynamic-LLaVA on Qwen2.5-VL: a `Qwen2_5_VLConfig` plus the sparsification fields.

Every field of the stock `Qwen2_5_VLConfig` keeps its meaning; the sparsification fields are those of every Dynamic
config (`sparse_settings.SparsityConfigMixin`), checked however they are set. An image becomes
`t * h * w / spatial_merge_size**2` tokens (its own resolution), so `vision_keep_tokens` is checked against each
image when it comes.

This file is a Hub remote-code module.
"""

from __future__ import annotations

from typing import Any

from transformers import Qwen2_5_VLConfig

from .sparse_settings import SPARSITY_CONFIG_DOC, SparsityConfigMixin

__all__ = ["DynamicQwen2_5_VLConfig"]


class DynamicQwen2_5_VLConfig(SparsityConfigMixin, Qwen2_5_VLConfig):
    model_type = "dynamic_qwen2_5_vl"

    def __init__(self, **kwargs: Any):
        self._set_sparsity_fields(kwargs)
        super().__init__(**kwargs)
        self.validate_sparsity()


DynamicQwen2_5_VLConfig.__doc__ = (
    "Configuration of [`DynamicQwen2_5_VLForConditionalGeneration`]: a `Qwen2_5_VLConfig` plus the sparsity "
    "fields.\n\n    Args (besides those of `Qwen2_5_VLConfig`):" + SPARSITY_CONFIG_DOC
)
