"""Configuration of Dynamic-LLaVA (ICLR 2025): a LLaVA config plus the sparsification fields.

Every field of the stock `LlavaConfig` keeps its meaning. The sparsification fields are flat attributes, so they show
up in `config.json` and can be set from `from_pretrained(..., vision_keep_rate=0.3)`. Every way of setting one (the
constructor, `from_pretrained` keyword arguments, attribute assignment, a per-call `generate(...)` override) goes
through the same checks and fails with the same clear errors.

This file is a Hub remote-code module.
"""

from __future__ import annotations

from typing import Any

from transformers import LlavaConfig

from .sparse_settings import PER_CALL_FIELDS, SPARSITY_CONFIG_DOC, SparsityConfigMixin, SparsitySettings

__all__ = ["PER_CALL_FIELDS", "DynamicLlavaConfig", "SparsitySettings"]


class DynamicLlavaConfig(SparsityConfigMixin, LlavaConfig):
    model_type = "dynamic_llava"

    def __init__(self, **kwargs: Any):
        self._set_sparsity_fields(kwargs)
        super().__init__(**kwargs)
        self.validate_sparsity()

    @property
    def fixed_tokens_per_image(self) -> int | None:
        """Tokens one image becomes (every image of LLaVA-1.5 has the same count)."""
        return self.tokens_per_image_for(None)

    def tokens_per_image_for(self, select_strategy: str | None) -> int | None:
        """Tokens one image becomes under `select_strategy` (None: the config's): `(image_size / patch_size)^2`,
        plus the class token for "full"."""
        vision = getattr(self, "vision_config", None)
        if vision is None or not hasattr(vision, "image_size"):
            return None
        strategy = select_strategy or getattr(self, "vision_feature_select_strategy", "default")
        return (vision.image_size // vision.patch_size) ** 2 + (1 if strategy == "full" else 0)

    @property
    def tokens_per_image(self) -> int | None:
        """Tokens one image becomes (every image of LLaVA-1.5 has the same count)."""
        return self.fixed_tokens_per_image


DynamicLlavaConfig.__doc__ = (
    "Configuration of [`DynamicLlavaForConditionalGeneration`]: a `LlavaConfig` plus the sparsity fields.\n\n"
    "    Args (besides those of `LlavaConfig`):" + SPARSITY_CONFIG_DOC
)
