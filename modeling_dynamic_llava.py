"""Dynamic-LLaVA (ICLR 2025, arXiv 2412.00876) on the stock transformers LLaVA-1.5: the LLaVA adapter of the
base-agnostic core (`sparse_model.py`, `sparse_flow.py`).

Split along transformers' own seam:

* `DynamicLlavaModel(SparseModelMixin, LlavaModel)` merges the image features (the stock vision tower and projector;
  every image becomes the same number of tokens) and runs the decoder with sparsification
  (`sparse_flow.sparse_decoder_forward`): the stock Llama decoder layers, rotary embedding and attention functions,
  plus the two predictors (`sparse_predictors.py`).
* `DynamicLlavaForConditionalGeneration(SparseGenerationMixin, LlavaForConditionalGeneration)` adds the LM head, the
  loss (with the keep-budget terms while training) and the `generate()` hooks that build the sparse cache.

The cache (`sparse_cache.DynamicLlavaCache`) holds the only state between calls; the model hands it one
`SparseChunk` per forward. Every transformers-version difference is in `transformers_compat.py`.

This file is a Hub remote-code module (flat imports only; nothing runs at import).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import LlavaForConditionalGeneration, LlavaModel
from transformers.cache_utils import Cache
from transformers.models.llava.modeling_llava import LlavaPreTrainedModel
from transformers.utils import logging

from .configuration_dynamic_llava import DynamicLlavaConfig

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

__all__ = [
    "DynamicLlavaCausalLMOutput",
    "DynamicLlavaForConditionalGeneration",
    "DynamicLlavaModel",
    "DynamicLlavaModelOutput",
]

# state-dict keys of exports made by dynamic-llava 0.1 (predictors at the top level) -> this layout
LEGACY_KEY_MAPPING = {
    r"^image_score_predictor": "model.image_score_predictor",
    r"^output_text_score_predictor": "model.output_text_score_predictor",
}
# the predictors stay float32 and out of bitsandbytes (named as each transformers version matches them)
_FP32_MODULES = keep_in_fp32_names(list(PREDICTORS), parent="model")


class DynamicLlavaModel(SparseModelMixin, LlavaModel):
    """`LlavaModel` whose decoder runs with Dynamic-LLaVA sparsification (see `sparse_flow.sparse_decoder_forward`)."""

    config_class = DynamicLlavaConfig

    def __init__(self, config: DynamicLlavaConfig):
        super().__init__(config)
        self._init_sparsity(config)

    @with_per_call_parameters
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        image_sizes: torch.Tensor | None = None,
        use_cache: bool | None = None,
        labels: torch.LongTensor | None = None,
        output_text_start: int | None = None,
        sparsity: SparsitySettings | None = None,
        **kwargs: Unpack[SparsityKwargs],
    ) -> DynamicLlavaModelOutput:
        """
        Same arguments as `LlavaModel.forward` (the cache as `cache` or `past_key_values`), plus:

        labels: training only, to find each row's final answer span (the output-text mask covers it).
        output_text_start: the column of the full sequence from which tokens are generated text (scored by the
            output-text predictor and, when dropped, kept out of layers >= `sparse_layer`). `generate()` sets it.
            None: with a cache, a one-token call on a non-empty cache is a generated token; otherwise prompt.
        vision_keep_tokens, vision_keep_rate, use_vision_predictor, use_output_text_predictor, image_scorer: this
            call's sparsity (`sparse_settings.SparsityKwargs`; None = the config's), validated like the config fields.
        sparsity: the same, already resolved (`generate()` passes it: the per-call fields of its keyword arguments,
            its `GenerationConfig` and the model's, in that order of precedence).
        """
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
                "vision_feature_layer": vision_feature_layer,
                "vision_feature_select_strategy": vision_feature_select_strategy,
                "image_sizes": image_sizes,
            },
            kwargs=kwargs,
        )

    # ---- the LLaVA-1.5 hooks of the core -------------------------------------------------------------------------

    def image_inputs_per_row(self, input_ids: Any, inputs_embeds: Any, model_kwargs: dict) -> dict[str, list[int]]:
        """For generate()'s expansion: entries of each image input per row (one image = one entry)."""
        mask = self._image_token_mask(input_ids, inputs_embeds)
        tokens = self.config.tokens_per_image_for(model_kwargs.get("vision_feature_select_strategy"))
        per_row = (mask.sum(-1) // tokens).tolist()
        names = ["pixel_values"] + (["image_sizes"] if model_kwargs.get("image_sizes") is not None else [])
        return {name: per_row for name in names}

    @staticmethod
    def _check_image_sizes(image_sizes: Any, num_images: int, side: int) -> None:
        """`image_sizes` (for towers that take images of any size) can only restate the one fixed size: every image
        here is `side` x `side`, so sizes that say otherwise are refused, not ignored."""
        if image_sizes is None:
            return
        sizes = torch.as_tensor(image_sizes)
        if sizes.shape != (num_images, 2) or bool((sizes != side).any()):
            raise ValueError(
                f"image_sizes {sizes.tolist()} cannot be honoured: this model's vision tower takes {side}x{side} "
                f"images only (the processor resizes every image to that), and {num_images} image(s) were given. "
                "Drop image_sizes."
            )

    def merge_images(
        self, input_ids: Any, inputs_embeds: torch.Tensor, image_inputs: dict, cache: Any, text_from: int | None
    ) -> tuple[torch.Tensor, ImageLayout | None]:
        """Check the image tokens against `pixel_values` (one host sync), encode, and put the features in place.
        Returns the embeddings and where the images are (None when the call has no image token: pixel_values of an
        earlier turn, warned and not used)."""
        pixel_values = image_inputs["pixel_values"]
        vision = self.config.vision_config
        expected = (vision.num_channels, vision.image_size, vision.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)}; this model expects [num_images, "
                f"{expected[0]}, {expected[1]}, {expected[2]}]. Preprocess images with the model's processor "
                "(AutoProcessor.from_pretrained(...)) and pass one image per <image> token."
            )
        strategy = select_strategy(self.config, image_inputs.get("vision_feature_select_strategy"))
        image_token_mask = self._image_token_mask(input_ids, inputs_embeds)
        if text_from is not None:
            image_token_mask[:, text_from:] = False  # generated text is never an image
        per_image = self.config.tokens_per_image_for(strategy)
        per_row = image_token_mask.sum(-1).tolist()
        total = sum(per_row)
        if total == 0 and cache is not None and not cache.is_empty:
            logger.warning_once(
                "pixel_values were passed with a chunk that has no image token and a filled cache: the images of an "
                "earlier turn are already in the cache, so these pixel_values are not used."
            )
            return inputs_embeds, None
        if total != pixel_values.shape[0] * per_image and strategy != self.config.vision_feature_select_strategy:
            raise ValueError(
                f"vision_feature_select_strategy={strategy!r} makes each image {per_image} tokens (the config's "
                f"{self.config.vision_feature_select_strategy!r}: {self.config.tokens_per_image}), but the input has "
                f"{total} image tokens for {pixel_values.shape[0]} image(s). Expand <image> with the same strategy "
                "(a processor with that vision_feature_select_strategy), or drop the per-call strategy."
            )
        if total != pixel_values.shape[0] * per_image:
            raise ValueError(
                f"The input has {total} image tokens ({total / per_image:g} images of {per_image} tokens) but "
                f"{pixel_values.shape[0]} image(s) were given in pixel_values. Put exactly one <image> in the text "
                "per image (the processor expands each to the image's tokens), or pass as many images as <image>."
            )
        if any(n % per_image for n in per_row):
            raise ValueError(
                f"A row has a number of image tokens that is not a multiple of {per_image}: {per_row}. Let the "
                "processor expand <image>; do not cut prompts inside an image."
            )
        counts = [n // per_image for n in per_row]
        layout = ImageLayout(image_token_mask, counts, [per_image] * sum(counts))
        tower = self.vision_tower
        tower_dtype = tower.dtype if tower.dtype.is_floating_point else pixel_values.dtype  # (quantized towers)
        self._check_image_sizes(image_inputs.get("image_sizes"), pixel_values.shape[0], vision.image_size)
        feature_layer = image_inputs.get("vision_feature_layer")
        out = self.get_image_features(
            pixel_values=pixel_values.to(tower_dtype),
            vision_feature_layer=feature_layer if feature_layer is not None else self.config.vision_feature_layer,
            vision_feature_select_strategy=strategy,
        )
        features = torch.cat(image_features_list(out), dim=0)
        merged = inputs_embeds.masked_scatter(
            image_token_mask[..., None].to(inputs_embeds.device), features.to(inputs_embeds)
        )
        return merged, layout


class DynamicLlavaForConditionalGeneration(SparseGenerationMixin, LlavaForConditionalGeneration):
    """`LlavaForConditionalGeneration` on a `DynamicLlavaModel`, with the sparse cache built by `generate()`."""

    config_class = DynamicLlavaConfig
    _no_split_modules = ["LlamaDecoderLayer", "CLIPEncoderLayer", "ImageScorePredictor", "OutputTextScorePredictor"]
    # float32 and never quantized: their top-k / threshold decisions are cut at margins half precision can flip
    _keep_in_fp32_modules = _FP32_MODULES
    _keep_in_fp32_modules_strict = _FP32_MODULES
    _supported_generation_modes = supported_generation_modes()

    def __init__(self, config: DynamicLlavaConfig):
        # LlavaForConditionalGeneration.__init__ would build a stock LlavaModel first; build ours directly
        LlavaPreTrainedModel.__init__(self, config)
        self.model = DynamicLlavaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any):
        """
        `PreTrainedModel.from_pretrained`, also reading exports of dynamic-llava 0.1 (predictors at the top of the
        state dict): those load a second time with the keys moved, and save in the current layout afterwards.
        """
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        if any(key.startswith(tuple(p[1:] + "." for p in LEGACY_KEY_MAPPING)) for key in info["unexpected_keys"]):
            logger.warning_once(
                "This folder was exported by dynamic-llava 0.1 (predictor weights at the top of the state dict); "
                "they are loaded under model.* . Re-export it (dynamic-llava export) to store the current layout."
            )
            base = dict(getattr(cls, "_checkpoint_conversion_mapping", None) or {})
            kwargs["key_mapping"] = {**base, **LEGACY_KEY_MAPPING, **(kwargs.get("key_mapping") or {})}
            model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
            if getattr(model, "_weight_conversions", None) is not None:
                model._weight_conversions = None  # (5.x would save the old layout back, reversing the renames)
        return (model, info) if wants_info else model

    @with_per_call_parameters
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        image_sizes: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_text_start: int | None = None,
        sparsity: SparsitySettings | None = None,
        return_dict: bool | None = None,
        **kwargs: Unpack[SparsityKwargs],
    ) -> DynamicLlavaCausalLMOutput | tuple:
        """
        Same arguments as `LlavaForConditionalGeneration.forward` (the cache as `cache` or `past_key_values`), plus
        the sparsity arguments of `DynamicLlavaModel.forward` (`output_text_start`, `sparsity` and the per-call
        fields of `sparse_settings.SparsityKwargs`).

        Returns a `DynamicLlavaCausalLMOutput` (the Llava output plus this call's decisions; a tuple with
        `return_dict=False`). A given cache must be a `DynamicLlavaCache` (`generate()` builds one by itself).
        """
        kwargs.pop("cache_position", None)  # positions come from position_ids / the cache's logical length
        num_items_in_batch = kwargs.get("num_items_in_batch")  # (the Trainer's; the model pops it)
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            image_sizes=image_sizes,
            use_cache=use_cache,
            labels=labels,
            output_text_start=output_text_start,
            sparsity=sparsity,
            **kwargs,
        )
        return self.sparse_lm_output(outputs, labels, logits_to_keep, return_dict, num_items_in_batch)
