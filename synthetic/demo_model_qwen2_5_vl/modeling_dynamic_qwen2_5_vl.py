"""Dynamic-LLaVA on the stock transformers Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`, `Qwen/Qwen2.5-VL-*`):
the Qwen2.5-VL adapter of the base-agnostic core (`sparse_model.py`, `sparse_flow.py`).

What differs from LLaVA, and how this adapter handles it:

* Dynamic resolution: `pixel_values` are flat patches `[patches, C*T*P*P]` with `image_grid_thw` `[images, 3]`; an
  image becomes `t * h * w / spatial_merge_size**2` tokens, so every image has its own count; budgets apply per
  image.
* 3-D rotary positions (M-RoPE): each token has a text position (the causal order and its position tag) and three
  rotary positions (time, height, width). A chunk with images gets the stock `get_rope_index` positions, offset to
  where the chunk starts; every other token's three positions are its text position plus its row's offset (the
  stock "rope delta"), which this adapter keeps in the cache with the row (`cache.row_state("rope_deltas")`, moved by
  beams and row selection) rather than on the model object. Kept tokens keep exactly their stock positions.
* Video input (`pixel_values_videos`) is refused: frames are not sparsified by this package.

This file is a Hub remote-code module (flat imports only; nothing runs at import).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLModel
from transformers.cache_utils import Cache
from transformers.generation.utils import GenerationMixin
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLPreTrainedModel
from transformers.utils import logging

from .configuration_dynamic_qwen2_5_vl import DynamicQwen2_5_VLConfig

# transformers 4.57 copies into its module cache only the files a remote-code module imports directly (its own
# imports are then read from there): every core file is imported here, from the entry module
from .sparse_cache import DynamicLlavaCache  # noqa: E402, F401
from .sparse_flow import DynamicLlavaCausalLMOutput, DynamicLlavaModelOutput, ImageLayout
from .sparse_masks import EMPTY  # noqa: E402, F401
from .sparse_model import PREDICTORS, SparseGenerationMixin, SparseModelMixin
from .sparse_predictors import ImageScorePredictor  # noqa: E402, F401
from .sparse_scorers import image_keep_scores  # noqa: E402, F401
from .sparse_settings import SparsityKwargs, SparsitySettings, with_per_call_parameters
from .sparse_training import budget_loss  # noqa: E402, F401
from .transformers_compat import (
    image_features_list,
    keep_in_fp32_names,
    predictor_keys_kept,
    qwen_rope_index,
    supported_generation_modes,
)

try:
    from typing import Unpack
except ImportError:  # Python 3.10
    from typing_extensions import Unpack

logger = logging.get_logger(__name__)

__all__ = ["DynamicQwen2_5_VLForConditionalGeneration", "DynamicQwen2_5_VLModel"]

_FP32_MODULES = keep_in_fp32_names(list(PREDICTORS), parent="model")
VIDEO_REFUSAL = (
    "Dynamic-LLaVA on Qwen2.5-VL sparsifies images, not videos: pixel_values_videos / video_grid_thw are not "
    "supported. Pass the frames you need as images (one image placeholder each), or use the stock model for video."
)


class DynamicQwen2_5_VLModel(SparseModelMixin, Qwen2_5_VLModel):
    """`Qwen2_5_VLModel` whose decoder runs with Dynamic-LLaVA sparsification."""

    config_class = DynamicQwen2_5_VLConfig

    def __init__(self, config: DynamicQwen2_5_VLConfig):
        super().__init__(config)
        self._init_sparsity(config)
        text = config.get_text_config(decoder=True)
        if getattr(text, "use_sliding_window", False) and getattr(text, "sliding_window", None):
            raise ValueError(
                "Dynamic-LLaVA does not support Qwen2.5-VL's sliding-window attention (use_sliding_window=True): its "
                "sparse layers need one mask over the kept past. Load the model with use_sliding_window=False (the "
                "released Qwen2.5-VL checkpoints use full attention)."
            )

    @with_per_call_parameters
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.IntTensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
        rope_deltas: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        output_text_start: int | None = None,
        sparsity: SparsitySettings | None = None,
        **kwargs: Unpack[SparsityKwargs],
    ) -> DynamicLlavaModelOutput:
        """
        Same arguments as `Qwen2_5_VLModel.forward` (the cache as `cache` or `past_key_values`; `mm_token_type_ids`
        is accepted and read from the input ids instead), plus those of `DynamicLlavaModel.forward`. `position_ids`:
        `[batch, q]` text positions (generate()'s), `[4, batch, q]` text positions first (the three rotary ones are
        derived again, as above), or `[3, batch, q]` rotary positions given by hand (used as given).
        """
        if pixel_values_videos is not None or video_grid_thw is not None or second_per_grid_ts is not None:
            raise ValueError(VIDEO_REFUSAL)
        if rope_deltas is not None:
            raise ValueError(
                "rope_deltas cannot be given: the M-RoPE offset of each row is kept in its DynamicLlavaCache "
                "(pass the cache of the conversation instead)."
            )
        given_rope = None
        if position_ids is not None and position_ids.dim() == 3 and position_ids.shape[0] == 3:
            given_rope, position_ids = position_ids, None
        if position_ids is None and attention_mask is not None and attention_mask.dim() == 2:
            # text positions from the padding mask (as the stock model derives its rotary ones)
            q = (input_ids if input_ids is not None else inputs_embeds).shape[1]
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -q:]
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
            image_inputs={"pixel_values": pixel_values, "image_grid_thw": image_grid_thw, "rope": given_rope},
            kwargs=kwargs,
        )

    # ---- the Qwen2.5-VL hooks of the core ------------------------------------------------------------------------

    def image_token_counts(self, image_grid_thw: torch.Tensor) -> list[int]:
        """Tokens each image becomes: `t * h * w / spatial_merge_size**2` of its grid."""
        merge = self.config.vision_config.spatial_merge_size
        return [int(n) for n in (torch.as_tensor(image_grid_thw).prod(-1) // merge**2).tolist()]

    def image_inputs_per_row(self, input_ids: Any, inputs_embeds: Any, model_kwargs: dict) -> dict[str, list[int]]:
        """For generate()'s expansion: patches per row of `pixel_values`, images per row of `image_grid_thw`."""
        grid = model_kwargs["image_grid_thw"]
        layout = self.layout_of(self._image_token_mask(input_ids, inputs_embeds), self.image_token_counts(grid))
        patches = torch.as_tensor(grid).prod(-1).tolist()
        per_row_patches, start = [], 0
        for n in layout.per_row:
            per_row_patches.append(int(sum(patches[start : start + n])))
            start += n
        return {"pixel_values": per_row_patches, "image_grid_thw": layout.per_row}

    def merge_images(
        self, input_ids: Any, inputs_embeds: torch.Tensor, image_inputs: dict, cache: Any, text_from: int | None
    ) -> tuple[torch.Tensor, ImageLayout | None]:
        """Check the image tokens against `image_grid_thw`, encode with the stock vision tower, put in place."""
        pixel_values, grid = image_inputs["pixel_values"], image_inputs.get("image_grid_thw")
        if grid is None:
            raise ValueError(
                "Qwen2.5-VL needs image_grid_thw with pixel_values (each image's temporal, height and width patch "
                "grid): pass the processor's image_grid_thw."
            )
        grid = torch.as_tensor(grid)
        if pixel_values.dim() != 2 or pixel_values.shape[0] != int(grid.prod(-1).sum()):
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)} but image_grid_thw {grid.tolist()} makes "
                f"{int(grid.prod(-1).sum())} patches: pass the processor's pixel_values and image_grid_thw together."
            )
        image_token_mask = self._image_token_mask(input_ids, inputs_embeds)
        if text_from is not None:
            image_token_mask[:, text_from:] = False  # generated text is never an image
        if cache is not None and not cache.is_empty and not bool(image_token_mask.any()):
            logger.warning_once(
                "pixel_values were passed with a chunk that has no image token and a filled cache: the images of an "
                "earlier turn are already in the cache, so these pixel_values are not used."
            )
            return inputs_embeds, None
        layout = self.layout_of(image_token_mask, self.image_token_counts(grid))
        out = self.get_image_features(pixel_values, grid)
        features = torch.cat(image_features_list(out), dim=0)
        merged = inputs_embeds.masked_scatter(
            image_token_mask[..., None].to(inputs_embeds.device), features.to(inputs_embeds)
        )
        return merged, layout

    def rope_positions(
        self, positions: torch.Tensor, input_ids: Any, images: ImageLayout | None, image_inputs: dict, call: dict
    ) -> torch.Tensor:
        """
        `[3, batch, q]` M-RoPE positions of this chunk (see the module doc): given ones as they are; a chunk with
        images the stock `get_rope_index` offset to the chunk's start; other tokens text position + row offset.
        """
        if image_inputs.get("rope") is not None:
            return image_inputs["rope"]
        cache = call["cache"]
        batch = positions.shape[0]
        offsets = cache.row_state("rope_deltas") if cache is not None else None
        if offsets is None:
            offsets = torch.zeros(batch, 1, dtype=torch.long, device=positions.device)
        if images is None:
            return positions[None] + offsets[None]
        if input_ids is None:
            raise ValueError(
                "Qwen2.5-VL derives the rotary positions of images from input_ids: pass input_ids with images "
                "(or position_ids [3, batch, q] with inputs_embeds)."
            )
        valid = call["token_valid"]
        relative, _ = qwen_rope_index(self, input_ids, image_inputs["image_grid_thw"], valid.long())
        start = positions.masked_fill(~valid, torch.iinfo(torch.long).max).min(-1, keepdim=True).values  # [B, 1]
        any_valid = valid.any(-1, keepdim=True)
        start = torch.where(any_valid, start, torch.zeros_like(start))
        rope = relative.to(positions.device) + (start + offsets)[None]
        if cache is not None:
            # the row's offset after this chunk: its last rotary position minus its last text position (the stock
            # offsets of 4.57 and 5.x count padding differently: derived here from the positions themselves)
            low = torch.iinfo(torch.long).min
            last_rope = rope.masked_fill(~valid[None], low).amax(dim=(0, 2)).view(-1, 1)
            last_text = positions.masked_fill(~valid, low).amax(dim=-1, keepdim=True)
            cache.set_row_state("rope_deltas", torch.where(any_valid, last_rope - last_text, offsets))
        return rope

    def gather_rope_positions(self, rope_positions: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """`[3, batch, q]` -> `[3, batch, c]`: the three rotary positions of the kept tokens."""
        return rope_positions.gather(2, index[None].expand(rope_positions.shape[0], -1, -1))


class DynamicQwen2_5_VLForConditionalGeneration(SparseGenerationMixin, Qwen2_5_VLForConditionalGeneration):
    """`Qwen2_5_VLForConditionalGeneration` on a `DynamicQwen2_5_VLModel`, with the sparse cache built by
    `generate()`."""

    config_class = DynamicQwen2_5_VLConfig
    _no_split_modules = [
        "Qwen2_5_VLDecoderLayer",
        "Qwen2_5_VLVisionBlock",
        "ImageScorePredictor",
        "OutputTextScorePredictor",
    ]
    _keep_in_fp32_modules = _FP32_MODULES
    _keep_in_fp32_modules_strict = _FP32_MODULES
    _supported_generation_modes = supported_generation_modes()
    _image_input_names = ("pixel_values", "image_grid_thw")
    _checkpoint_conversion_mapping = predictor_keys_kept(
        getattr(Qwen2_5_VLForConditionalGeneration, "_checkpoint_conversion_mapping", None), list(PREDICTORS)
    )  # (4.57 and 5.0 would move the predictors' keys into the language model)

    def __init__(self, config: DynamicQwen2_5_VLConfig):
        # Qwen2_5_VLForConditionalGeneration.__init__ would build a stock Qwen2_5_VLModel first; build ours directly
        Qwen2_5_VLPreTrainedModel.__init__(self, config)
        self.model = DynamicQwen2_5_VLModel(config)
        text = config.get_text_config(decoder=True)
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.post_init()

    def _prepare_position_ids_for_generation(self, inputs_tensor: torch.Tensor, model_kwargs: dict):
        """Text positions only (from the padding mask, as for any decoder): the model derives the three rotary
        positions itself from them and the offsets it keeps with each row of the cache (5.x's stock hook reads
        offsets left on the model object by an earlier call)."""
        return GenerationMixin._prepare_position_ids_for_generation(self, inputs_tensor, model_kwargs)

    @with_per_call_parameters
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.IntTensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
        rope_deltas: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_text_start: int | None = None,
        sparsity: SparsitySettings | None = None,
        return_dict: bool | None = None,
        **kwargs: Unpack[SparsityKwargs],
    ) -> DynamicLlavaCausalLMOutput | tuple:
        """Same arguments as `Qwen2_5_VLForConditionalGeneration.forward`, plus the sparsity arguments."""
        kwargs.pop("cache_position", None)  # positions come from position_ids / the cache's logical length
        num_items_in_batch = kwargs.get("num_items_in_batch")  # (the Trainer's; the model pops it)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            pixel_values=pixel_values,
            pixel_values_videos=pixel_values_videos,
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            mm_token_type_ids=mm_token_type_ids,
            second_per_grid_ts=second_per_grid_ts,
            rope_deltas=rope_deltas,
            labels=labels,
            output_text_start=output_text_start,
            sparsity=sparsity,
            **kwargs,
        )
        return self.sparse_lm_output(outputs, labels, logits_to_keep, return_dict, num_items_in_batch)
