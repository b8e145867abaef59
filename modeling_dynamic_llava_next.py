"""Dynamic-LLaVA on the stock transformers LLaVA-NeXT (`LlavaNextForConditionalGeneration`, llava-hf's
`llava-v1.6-*` checkpoints): the LLaVA-NeXT adapter of the base-agnostic core (`sparse_model.py`, `sparse_flow.py`).

An image is anyres-tiled: a base tile plus the high-resolution tiles of its best-fitting grid, unpadded, with one
image-newline token after each row of patches (stock `pack_image_features`), so each image has its own number of
tokens (several thousand at llava-hf's default resolution). Budgets apply per image over all its tokens:
`vision_keep_tokens` keeps that many of an image's tokens, `vision_keep_rate` keeps `int(tokens * rate)` of them. The
newline tokens are image tokens like the others: scored, and kept or dropped by the same rule (a dropped newline
leaves the kept tokens their original positions).

This file is a Hub remote-code module (flat imports only; nothing runs at import).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import LlavaNextForConditionalGeneration, LlavaNextModel
from transformers.cache_utils import Cache
from transformers.models.llava_next.modeling_llava_next import LlavaNextPreTrainedModel, image_size_to_num_patches
from transformers.utils import logging

from .configuration_dynamic_llava_next import DynamicLlavaNextConfig

# transformers 4.57 copies into its module cache only the files a remote-code module imports directly (its own
# imports are then read from there): every core file is imported here, from the entry module
from .sparse_cache import DynamicLlavaCache  # noqa: E402, F401
from .sparse_flow import DynamicLlavaCausalLMOutput, DynamicLlavaModelOutput, ImageLayout
from .sparse_masks import EMPTY  # noqa: E402, F401
from .sparse_model import PREDICTORS, SparseGenerationMixin, SparseModelMixin, select_strategy
from .sparse_predictors import ImageScorePredictor  # noqa: E402, F401
from .sparse_scorers import image_keep_scores  # noqa: E402, F401
from .sparse_settings import SparsityKwargs, SparsitySettings, with_per_call_parameters
from .sparse_training import budget_loss  # noqa: E402, F401
from .transformers_compat import image_features_list, keep_in_fp32_names, supported_generation_modes

try:
    from typing import Unpack
except ImportError:  # Python 3.10
    from typing_extensions import Unpack

logger = logging.get_logger(__name__)

__all__ = ["DynamicLlavaNextForConditionalGeneration", "DynamicLlavaNextModel"]

_FP32_MODULES = keep_in_fp32_names(list(PREDICTORS), parent="model")


class DynamicLlavaNextModel(SparseModelMixin, LlavaNextModel):
    """`LlavaNextModel` whose decoder runs with Dynamic-LLaVA sparsification."""

    config_class = DynamicLlavaNextConfig

    def __init__(self, config: DynamicLlavaNextConfig):
        super().__init__(config)
        self._init_sparsity(config)

    @with_per_call_parameters
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        use_cache: bool | None = None,
        labels: torch.LongTensor | None = None,
        output_text_start: int | None = None,
        sparsity: SparsitySettings | None = None,
        **kwargs: Unpack[SparsityKwargs],
    ) -> DynamicLlavaModelOutput:
        """Same arguments as `LlavaNextModel.forward`, plus those of `DynamicLlavaModel.forward`."""
        return self.sparse_forward(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            use_cache=use_cache,
            labels=labels,
            output_text_start=output_text_start,
            sparsity=sparsity,
            image_inputs={
                "pixel_values": pixel_values,
                "image_sizes": image_sizes,
                "vision_feature_layer": vision_feature_layer,
                "vision_feature_select_strategy": vision_feature_select_strategy,
            },
            kwargs=kwargs,
        )

    # ---- the LLaVA-NeXT hooks of the core ------------------------------------------------------------------------

    def image_token_counts(self, image_sizes: torch.Tensor, strategy: str) -> list[int]:
        """Tokens each image becomes (base tile, unpadded high-resolution tiles, newlines): the stock packing run on
        empty features of each image's tile grid (no vision tower)."""
        vision = self.config.vision_config
        side = vision.image_size // vision.patch_size
        per_tile = side * side + (0 if strategy == "default" else 1)
        empty = [
            torch.zeros(
                image_size_to_num_patches(size, self.config.image_grid_pinpoints, vision.image_size), per_tile, 1
            )
            for size in torch.as_tensor(image_sizes).tolist()
        ]
        packed, _ = self.pack_image_features(empty, image_sizes, strategy, image_newline=torch.zeros(1))
        return [int(image.shape[0]) for image in packed]

    def image_inputs_per_row(self, input_ids: Any, inputs_embeds: Any, model_kwargs: dict) -> dict[str, list[int]]:
        """For generate()'s expansion: images per row of `pixel_values` and `image_sizes`."""
        strategy = select_strategy(self.config, model_kwargs.get("vision_feature_select_strategy"))
        sizes = self.image_token_counts(model_kwargs["image_sizes"], strategy)
        layout = self.layout_of(self._image_token_mask(input_ids, inputs_embeds), sizes)
        return {"pixel_values": layout.per_row, "image_sizes": layout.per_row}

    def merge_images(
        self, input_ids: Any, inputs_embeds: torch.Tensor, image_inputs: dict, cache: Any, text_from: int | None
    ) -> tuple[torch.Tensor, ImageLayout | None]:
        """Check the image tokens against the images (their counts from `image_sizes`), encode, put in place."""
        pixel_values, image_sizes = image_inputs["pixel_values"], image_inputs.get("image_sizes")
        if image_sizes is None:
            raise ValueError(
                "LLaVA-NeXT needs image_sizes with pixel_values (each image's original height and width): pass the "
                "processor's image_sizes."
            )
        if pixel_values.dim() not in (4, 5) or pixel_values.shape[0] != len(image_sizes):
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)} for {len(image_sizes)} image_sizes; LLaVA-NeXT "
                "expects [num_images, tiles, 3, H, W] and one image size per image (the processor's outputs)."
            )
        strategy = select_strategy(self.config, image_inputs.get("vision_feature_select_strategy"))
        image_token_mask = self._image_token_mask(input_ids, inputs_embeds)
        if text_from is not None:
            image_token_mask[:, text_from:] = False  # generated text is never an image
        if cache is not None and not cache.is_empty and not bool(image_token_mask.any()):
            logger.warning_once(
                "pixel_values were passed with a chunk that has no image token and a filled cache: the images of an "
                "earlier turn are already in the cache, so these pixel_values are not used."
            )
            return inputs_embeds, None
        layout = self.layout_of(image_token_mask, self.image_token_counts(image_sizes, strategy))
        tower = self.vision_tower
        tower_dtype = tower.dtype if tower.dtype.is_floating_point else pixel_values.dtype  # (quantized towers)
        feature_layer = image_inputs.get("vision_feature_layer")
        out = self.get_image_features(
            pixel_values=pixel_values.to(tower_dtype),
            image_sizes=image_sizes,
            vision_feature_layer=feature_layer if feature_layer is not None else self.config.vision_feature_layer,
            vision_feature_select_strategy=strategy,
        )
        features = torch.cat(image_features_list(out), dim=0)
        merged = inputs_embeds.masked_scatter(
            image_token_mask[..., None].to(inputs_embeds.device), features.to(inputs_embeds)
        )
        return merged, layout


class DynamicLlavaNextForConditionalGeneration(SparseGenerationMixin, LlavaNextForConditionalGeneration):
    """`LlavaNextForConditionalGeneration` on a `DynamicLlavaNextModel`, with the sparse cache built by `generate()`."""

    config_class = DynamicLlavaNextConfig
    _no_split_modules = [
        "LlamaDecoderLayer",
        "MistralDecoderLayer",
        "CLIPEncoderLayer",
        "ImageScorePredictor",
        "OutputTextScorePredictor",
    ]
    _keep_in_fp32_modules = _FP32_MODULES
    _keep_in_fp32_modules_strict = _FP32_MODULES
    _supported_generation_modes = supported_generation_modes()

    def __init__(self, config: DynamicLlavaNextConfig):
        # LlavaNextForConditionalGeneration.__init__ would build a stock LlavaNextModel first; build ours directly
        LlavaNextPreTrainedModel.__init__(self, config)
        self.model = DynamicLlavaNextModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    @with_per_call_parameters
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_text_start: int | None = None,
        sparsity: SparsitySettings | None = None,
        return_dict: bool | None = None,
        **kwargs: Unpack[SparsityKwargs],
    ) -> DynamicLlavaCausalLMOutput | tuple:
        """Same arguments as `LlavaNextForConditionalGeneration.forward`, plus the sparsity arguments."""
        kwargs.pop("cache_position", None)  # positions come from position_ids / the cache's logical length
        num_items_in_batch = kwargs.get("num_items_in_batch")  # (the Trainer's; the model pops it)
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            image_sizes=image_sizes,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            use_cache=use_cache,
            labels=labels,
            output_text_start=output_text_start,
            sparsity=sparsity,
            **kwargs,
        )
        return self.sparse_lm_output(outputs, labels, logits_to_keep, return_dict, num_items_in_batch)
