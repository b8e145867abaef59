"""The base-agnostic half of every Dynamic model: what a model without head and a model with the LM head add to a
stock vision-language model of transformers.

* `SparseModelMixin` goes before a stock `...Model` (`class DynamicXModel(SparseModelMixin, XModel)`): the two
  predictors, the cache checks, and `sparse_forward`, which validates a call, builds its `SparseCall` and runs
  `sparse_flow.sparse_decoder_forward`. The base adapter supplies `merge_images` (encode the images of a chunk and put
  their features in place: where they are, how many tokens each has), `rope_positions` (the positions its rotary
  embedding takes) and `gather_rope_positions`, and a thin `forward` with the stock signature.
* `SparseGenerationMixin` goes before a stock `...ForConditionalGeneration`: the LM head and loss
  (`sparse_lm_output`), the `generate()` hooks that build the sparse cache and keep per-call settings, stopped rows
  and later turns right, and the beam / `num_return_sequences` expansion of each row's images
  (`image_inputs_per_row` of the adapter).

A new base is one adapter module: its config (`SparsityConfigMixin` + the stock config), its model and its
generation class, each a few hooks over the stock classes.

This file is a Hub remote-code module (flat imports only; nothing runs at import).
"""

from __future__ import annotations

import copy
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from transformers import __version__ as transformers_version
from transformers.generation.stopping_criteria import StoppingCriteriaList
from transformers.utils import logging

from .sparse_cache import DynamicLlavaCache, DynamicLlavaStaticCache
from .sparse_flow import (
    PROMPT_ONLY,
    DynamicLlavaCausalLMOutput,
    DynamicLlavaModelOutput,
    ImageLayout,
    SparseCall,
    sparse_decoder_forward,
)
from .sparse_masks import all_true
from .sparse_predictors import ImageScorePredictor, OutputTextScorePredictor
from .sparse_settings import SparsitySettings, per_call_overrides, pop_per_call_fields
from .sparse_training import TRAINING_ATTENTION, register_training_attention
from .transformers_compat import (
    CACHE_KEY,
    CHUNKED_PREFILL_POSITIONS_FROM_CACHE,
    GENERATE_CONTINUES_A_CACHE_WITHOUT_USE_CACHE,
    GENERATION_CONFIG_HAS_MAX_CACHE_LEN,
)

logger = logging.get_logger(__name__)

__all__ = ["SparseGenerationMixin", "SparseModelMixin"]

# cache implementations generate() can build: ours, growing ("dynamic", the default) or preallocated ("static")
SUPPORTED_CACHE_IMPLEMENTATIONS = (None, "dynamic", "static")
# the predictors' module names under the model without head (float32, never quantized)
PREDICTORS = ("image_score_predictor", "output_text_score_predictor")


def is_dynamic_llava_cache(cache: Any) -> bool:
    """A Dynamic-LLaVA cache, from this module or a Hub folder's copy of it (declared, not `isinstance`)."""
    return bool(getattr(type(cache), "is_dynamic_llava_cache", False))


# ---------------------------------------------------------------------------------------------------------------
# The model without head
# ---------------------------------------------------------------------------------------------------------------


def select_strategy(config: Any, strategy: str | None) -> str:
    """A call's `vision_feature_select_strategy` (None: the config's), one of the CLIP-tower bases' two."""
    strategy = strategy if strategy is not None else config.vision_feature_select_strategy
    if strategy not in ("default", "full"):
        raise ValueError(
            f"vision_feature_select_strategy={strategy!r} is not one of 'default' (drop the class token) or 'full'."
        )
    return strategy


class SparseModelMixin:
    """The predictors, the cache checks and the forward of a Dynamic model without head (see the module doc)."""

    def _init_sparsity(self, config: Any) -> None:
        """Build the predictors (after the stock `__init__`)."""
        hidden = config.get_text_config(decoder=True).hidden_size
        d = config.predictor_d_model
        self.image_score_predictor = ImageScorePredictor(
            hidden, d, config.predictor_nhead, config.predictor_dim_feedforward, config.predictor_num_layers
        )
        self.output_text_score_predictor = OutputTextScorePredictor(hidden, d)
        # Gumbel-softmax temperature while training (training.GumbelTemperatureCallback: 0.1 ** (step / max_steps))
        self.gumbel_tau = 1.0
        self.gumbel_noise = True

    # ---- hooks of the base adapter ------------------------------------------------------------------------------

    def merge_images(
        self, input_ids: Any, inputs_embeds: torch.Tensor, image_inputs: dict, cache: Any, text_from: int | None
    ) -> tuple[torch.Tensor, ImageLayout | None]:
        """Encode the images of this chunk, put their features at the image tokens, and say where they are.
        `text_from`: a column from which the input is generated text (never images), or None."""
        raise NotImplementedError

    def rope_positions(
        self, positions: torch.Tensor, input_ids: Any, images: ImageLayout | None, image_inputs: dict, call: dict
    ) -> torch.Tensor:
        """The positions the base's rotary embedding takes for this chunk (Llama-style bases: `positions`)."""
        return positions

    def gather_rope_positions(self, rope_positions: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """`rope_positions` of the tokens `index` (`[batch, c]`) of each row (Llama-style: `[batch, q]`)."""
        return rope_positions.gather(1, index)

    def has_image_inputs(self, image_inputs: dict) -> bool:
        return image_inputs.get("pixel_values") is not None

    # ---- the forward -------------------------------------------------------------------------------------------

    def sparse_forward(
        self,
        *,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        cache: Any,
        use_cache: bool | None,
        labels: torch.Tensor | None,
        output_text_start: int | None,
        sparsity: SparsitySettings | None,
        image_inputs: dict,
        kwargs: dict,
    ) -> DynamicLlavaModelOutput:
        """The forward of every base: check the call, merge its images, build its `SparseCall`, run the flow."""
        for unsupported in ("output_attentions", "output_hidden_states"):
            if kwargs.pop(unsupported, False):
                raise ValueError(f"{type(self).__name__} does not support {unsupported}=True yet.")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        loss_tokens = kwargs.pop("num_items_in_batch", None)  # (the Trainer's; the head reads it too)
        overrides = pop_per_call_fields(kwargs)
        if sparsity is not None and any(value is not None for value in overrides.values()):
            raise TypeError("Pass the per-call sparsity fields or sparsity=, not both.")
        settings = sparsity if sparsity is not None else self.config.sparsity_settings(**overrides)
        cache = self._check_cache(cache, settings)
        if cache is not None:
            self._check_cache_history(cache)
        training = self.training and settings.enabled
        if training and settings.image_scorer == "attention":
            raise ValueError(
                "image_scorer='attention' is a training-free rule: training learns the image predictor. Train with "
                "image_scorer='predictor' (the default), or call model.eval() to use the attention rule."
            )
        text_config = self.config.get_text_config(decoder=True)
        if cache is None and not training and (use_cache if use_cache is not None else text_config.use_cache):
            cache = DynamicLlavaCache(self.config, sparse_layer=settings.cache_sparse_layer)
        # a cache that is given is used and updated, whatever use_cache says (as the stock models do)
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        batch, q = inputs_embeds.shape[:2]
        if cache is not None:
            self._check_cache_rows(cache, batch)
        if training and cache is not None:
            raise ValueError(
                "A model in training mode (sparsification on) runs without a cache: every token goes through every "
                "layer. Call model.eval() to decode with a cache."
            )
        images = None
        if not self.has_image_inputs(image_inputs):
            self._check_no_image_tokens(input_ids, q)
        else:
            text_from = output_text_start if output_text_start is not None and cache is None else None
            inputs_embeds, images = self.merge_images(input_ids, inputs_embeds, image_inputs, cache, text_from)

        device = inputs_embeds.device
        static = cache is not None and cache.is_preallocated  # (no host reads of its length)
        past_length = cache.get_seq_length() if cache is not None and not static else 0
        start = cache.length if static and cache.length is not None else past_length
        columns = (torch.arange(q, device=device) + start).expand(batch, q)
        token_valid = self._token_valid(attention_mask, batch, q, past_length, cache, static, columns)
        positions = self._positions(position_ids, start, batch, q, device)
        generated_from = self._generated_from(q, cache, past_length, output_text_start)
        situation = {
            "cache": cache,
            "static": static,
            "past_length": past_length,
            "attention_mask": attention_mask,
            "token_valid": token_valid,
            "position_ids": position_ids,
            "columns": columns,
        }
        rope_positions = self.rope_positions(positions, input_ids, images, image_inputs, situation)
        call = SparseCall(
            batch=batch,
            q=q,
            settings=settings,
            sparse_layer=settings.cache_sparse_layer if cache is None else cache.sparse_layer,
            cache=cache,
            static=static,
            past_length=past_length,
            positions=positions,
            rope_positions=rope_positions,
            columns=columns,
            token_valid=token_valid,
            attention_mask=attention_mask,
            generated_from=generated_from,
            output_text_start=output_text_start,
            images=images,
            training=training,
            labels=labels if training else None,
            loss_tokens=loss_tokens if training else None,
        )
        return sparse_decoder_forward(self, call, inputs_embeds)

    # ---- the inputs of one call --------------------------------------------------------------------------------

    def _check_no_image_tokens(self, input_ids: torch.Tensor | None, q: int) -> None:
        """A prompt chunk without images must not hold image tokens (one host read; decode steps skip it)."""
        if input_ids is None or q <= 1:
            return
        count = int((input_ids == self.config.image_token_id).sum())
        if count:
            raise ValueError(
                f"The input holds {count} image tokens but no pixel_values: pass the images of this chunk "
                "(the processor's pixel_values), or remove the image placeholders."
            )

    @staticmethod
    def _positions(position_ids: Any, start: Any, batch: int, q: int, device: torch.device) -> torch.Tensor:
        """`[batch, q]` long, each token's position (the position tag, and the causal order)."""
        if position_ids is None:
            return (torch.arange(q, device=device) + start).expand(batch, q)
        if position_ids.dim() == 3:  # ([channels, batch, q] M-RoPE positions: the first channel is the text one)
            position_ids = position_ids[0]
        if position_ids.dim() != 2 or position_ids.shape[-1] != q:
            raise ValueError(f"position_ids has shape {tuple(position_ids.shape)}; expected [batch, {q}].")
        return position_ids.expand(batch, q) if position_ids.shape[0] != batch else position_ids

    @staticmethod
    def _token_valid(attention_mask, batch, q, past_length, cache, static, columns) -> torch.Tensor:
        """`[batch, q]` bool, the real tokens of this call (from the 2D padding mask). Never written to."""
        if attention_mask is None:
            return all_true(batch, q, columns.device)
        if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] < q:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; this call needs a 2D mask "
                f"[batch={batch}, past + q] with q={q} new tokens (1 = real token, 0 = padding)."
            )
        if static:  # (generate() pads the mask to the cache's columns: read this call's columns)
            return attention_mask.to(columns.device).gather(1, columns).bool()
        if cache is not None and attention_mask.shape[1] != past_length + q:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[1]} tokens, but the cache holds {past_length} and this "
                f"call adds {q}: pass the mask of the whole sequence [batch, {past_length + q}]."
            )
        return attention_mask[:, -q:].to(device=columns.device, dtype=torch.bool)

    @staticmethod
    def _generated_from(q: int, cache: Any, past_length: int, output_text_start: int | None) -> int | None:
        """Index in this call's chunk from which tokens are generated text, or None (all prompt)."""
        if output_text_start is None:  # a manual call: one token on a non-empty cache is a decode step
            return 0 if (cache is not None and q == 1 and not cache.is_empty) else None
        if output_text_start == PROMPT_ONLY:
            return None
        if cache is None:
            return output_text_start if output_text_start < q else None
        if q == 1:  # after the prompt, every one-token call is a generated token (no host read of the length)
            return 0
        first = max(output_text_start - past_length, 0)
        return first if first < q else None

    def _image_token_mask(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """`[batch, q]` bool at the image tokens (from the ids, or by comparing embeddings with the image token's)."""
        token_id = self.config.image_token_id
        if input_ids is not None:
            return input_ids == token_id
        embedding = self.get_input_embeddings()(torch.tensor(token_id, device=inputs_embeds.device))
        return (inputs_embeds == embedding).all(-1)

    @staticmethod
    def layout_of(image_token_mask: torch.Tensor, sizes: list[int], what: str = "image") -> ImageLayout:
        """
        The `ImageLayout` of a chunk whose image tokens are `image_token_mask` (`[batch, q]`) and whose images have
        `sizes` tokens each, in order (row by row): one host read, and a clear error when they do not add up.
        """
        per_row_tokens = image_token_mask.sum(-1).tolist()
        total = sum(per_row_tokens)
        if total != sum(sizes):
            raise ValueError(
                f"The input has {total} {what} tokens but the {len(sizes)} {what}(s) given make {sum(sizes)} "
                f"({sizes}). Put exactly one {what} placeholder in the text per {what} and let the processor expand "
                f"it, or pass as many {what}s as placeholders."
            )
        per_row, image = [], 0
        for row, tokens in enumerate(per_row_tokens):
            count = 0
            while tokens > 0 and image < len(sizes):
                tokens -= sizes[image]
                image += 1
                count += 1
            if tokens != 0:
                raise ValueError(
                    f"Row {row} has image tokens that do not match whole {what}s ({per_row_tokens[row]} tokens; the "
                    f"{what}s in order have {sizes} tokens): let the processor expand each placeholder, do not cut "
                    "prompts inside an image."
                )
            per_row.append(count)
        return ImageLayout(image_token_mask, per_row, list(sizes))

    # ---- the cache -----------------------------------------------------------------------------------------------

    def _check_cache(self, cache: Any, settings: SparsitySettings) -> DynamicLlavaCache | None:
        """A given cache must be a Dynamic-LLaVA cache built for this model's layers and sparse layer."""
        if cache is None:
            return None
        if not is_dynamic_llava_cache(cache):
            filled = cache.get_seq_length() if hasattr(cache, "get_seq_length") else "?"
            raise TypeError(
                f"{type(self).__name__} needs its own cache, got a {type(cache).__name__} holding {filled} tokens. "
                "Pass no cache (generate() and forward() build one), or DynamicLlavaCache(model.config) (filled in "
                "place, for multi-turn), or the cache returned by an earlier call of this model."
            )
        num_layers = self.config.get_text_config(decoder=True).num_hidden_layers
        if len(cache.layers) != num_layers:
            raise ValueError(
                f"This DynamicLlavaCache has {len(cache.layers)} layers; the model has {num_layers}. Build it with "
                "DynamicLlavaCache(model.config)."
            )
        if settings.enabled and cache.sparse_layer != settings.sparse_layer:
            built = (
                "with sparsification off (all layers dense)"
                if cache.sparse_layer == num_layers
                else f"for sparse_layer={cache.sparse_layer}"
            )
            raise ValueError(
                f"This DynamicLlavaCache was built {built}, but the model sparsifies from layer "
                f"{settings.sparse_layer}. Pass a cache built with DynamicLlavaCache(model.config), or none."
            )
        return cache

    @staticmethod
    def _check_cache_history(cache: DynamicLlavaCache) -> None:
        """A cache filled by beam search holds the last running beams, not the returned sequences: refused."""
        if getattr(cache, "filled_by_beam_search", False):
            raise ValueError(
                "This cache was filled by beam search: its rows hold the last running beams, not the sequences "
                "generate() returned, so continuing it would give a row another beam's history. Continue the "
                "conversation without a cache (pass the returned sequences; the history is computed again), or run "
                "that turn with num_beams=1."
            )

    @staticmethod
    def _check_cache_rows(cache: DynamicLlavaCache, rows: int, expand: int = 1) -> None:
        """A filled cache continues the same `rows` (or `rows * expand`, once generate() repeats them for beams or
        `num_return_sequences`); an empty one takes any."""
        if cache.batch_size not in (0, rows, rows * expand):
            raise ValueError(
                f"The cache holds {cache.batch_size} rows but this call has {rows}. A cache continues the same rows: "
                "pass the rows it was filled with (in the same order), or no cache to start over."
            )


# ---------------------------------------------------------------------------------------------------------------
# The model with the LM head
# ---------------------------------------------------------------------------------------------------------------


class SparseGenerationMixin:
    """The head, the loss and the `generate()` hooks of a Dynamic model with the LM head (see the module doc)."""

    # generate() must not make a DynamicCache for us (4.57), and assisted decoding (needs crop) is refused
    _is_stateful = True
    _skip_keys_device_placement = ["past_key_values", "cache"]
    # the sparse layers need a 4D mask over (kept past + chunk): flash-attention (2D masks only) and flex attention
    # are refused by from_pretrained with transformers' own message; sdpa and eager are supported
    _supports_flash_attn = False
    # the loss honours `num_items_in_batch` (`sparse_lm_output`): the Trainer passes it and does not rescale
    accepts_loss_kwargs = True
    _supports_flex_attn = False
    _supports_attention_backend = False

    @property
    def image_score_predictor(self) -> ImageScorePredictor:
        return self.model.image_score_predictor

    @property
    def output_text_score_predictor(self) -> OutputTextScorePredictor:
        return self.model.output_text_score_predictor

    @property
    def gumbel_tau(self) -> float:
        return self.model.gumbel_tau

    @gumbel_tau.setter
    def gumbel_tau(self, value: float) -> None:
        self.model.gumbel_tau = value

    @property
    def gumbel_noise(self) -> bool:
        """False: the training masks are the straight-through argmax (no Gumbel noise), for checks."""
        return self.model.gumbel_noise

    @gumbel_noise.setter
    def gumbel_noise(self, value: bool) -> None:
        self.model.gumbel_noise = value

    def train(self, mode: bool = True):
        """Training mode keeps every token and uses the masked softmax in layers >= sparse_layer (see
        sparse_training.py); eval mode restores the attention implementation it had."""
        super().train(mode)
        text = self.config.get_text_config(decoder=True)
        if mode and self.config.sparsification_enabled and text._attn_implementation != TRAINING_ATTENTION:
            register_training_attention()
            self._inference_attn_implementation = text._attn_implementation
            text._attn_implementation = TRAINING_ATTENTION
        elif not mode and text._attn_implementation == TRAINING_ATTENTION:
            text._attn_implementation = getattr(self, "_inference_attn_implementation", "sdpa")
        return self

    # ---- saving --------------------------------------------------------------------------------------------------

    def save_pretrained(self, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
        """
        The stock `save_pretrained`, written as this package's class: FSDP2 (`fully_shard`, `DistributedConfig`)
        puts a wrapper class above it, whose name and module transformers would otherwise write into `auto_map` and
        `architectures` (and whose torch files it would copy as remote code). Sharded weights are gathered by
        transformers as for the stock model.
        """
        wrapper = type(self)
        own = next(c for c in wrapper.__mro__ if not c.__module__.startswith("torch.") and c.__name__ != "FSDPModule")
        if own is wrapper:
            return super().save_pretrained(save_directory, *args, **kwargs)
        self.__class__ = own  # (only what the class names decide; the wrapper's hooks live on the module itself)
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self.__class__ = wrapper

    # ---- the head and the loss ---------------------------------------------------------------------------------

    def sparse_lm_output(
        self,
        outputs: DynamicLlavaModelOutput,
        labels: torch.Tensor | None,
        logits_to_keep: int | torch.Tensor,
        return_dict: bool | None,
        num_items_in_batch: Any = None,
    ) -> DynamicLlavaCausalLMOutput | tuple:
        """
        The LM head over the computed positions, the loss (labels follow `token_indices`), the decisions.

        The loss is token-weighted as stock's: the cross-entropy sums over label tokens and divides by
        `num_items_in_batch` (the Trainer's count over one optimizer step) or this batch's own count, and each budget
        term is a sum over rows weighted by their label tokens over the same count (`sparse_training.budget_loss`),
        so gradient accumulation and several processes give one large batch's loss and gradients.
        """
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])

        loss = ce = None
        if labels is not None:
            if outputs.token_indices is not None:
                gathered = labels.gather(1, outputs.token_indices.clamp(min=0).to(labels.device))
                labels = gathered.masked_fill(outputs.token_indices.to(labels.device) < 0, -100)
            vocab_size = self.config.get_text_config(decoder=True).vocab_size
            ce = self.loss_function(
                logits=logits, labels=labels, vocab_size=vocab_size, num_items_in_batch=num_items_in_batch
            )
            loss = ce
            if outputs.vision_budget_loss is not None:
                loss = ce + self.config.mask_loss_weight * (
                    outputs.vision_budget_loss + outputs.output_text_budget_loss
                )
        output = DynamicLlavaCausalLMOutput(
            loss=loss,
            logits=logits,
            kept_vision_indices=outputs.kept_vision_indices,
            output_text_keep=outputs.output_text_keep,
            token_indices=outputs.token_indices,
            output_text_start=outputs.output_text_start,
            ce_loss=ce if outputs.vision_budget_loss is not None else None,
            vision_budget_loss=outputs.vision_budget_loss,
            output_text_budget_loss=outputs.output_text_budget_loss,
            vision_keep_ratio=outputs.vision_keep_ratio,
            output_text_keep_ratio=outputs.output_text_keep_ratio,
            **{CACHE_KEY: getattr(outputs, CACHE_KEY)},
        )
        return output if return_dict is not False else output.to_tuple()

    # ---- generate() ----------------------------------------------------------------------------------------------

    def generate(self, inputs: torch.Tensor | None = None, generation_config: Any = None, **kwargs: Any):
        """
        `GenerationMixin.generate`, plus:

        * the per-call sparsity fields (`sparse_settings.SparsityKwargs`: `vision_keep_tokens`, `vision_keep_rate`,
          `use_vision_predictor`, `use_output_text_predictor`, `image_scorer`), as keyword arguments or as fields of
          the `GenerationConfig` passed or of `model.generation_config` (that order of precedence, then the model
          config), validated before anything runs;
        * `cache_implementation` "dynamic" (default) or "static" (`DynamicLlavaStaticCache`, for compiled decoding),
          with `max_cache_len` sizing the static cache for later turns too.

        A model in training mode generates in eval mode (and is put back).
        """
        overrides = pop_per_call_fields(kwargs)
        if kwargs.get("sparsity") is not None:
            raise TypeError("generate() takes the per-call sparsity fields themselves, not sparsity=.")
        config = generation_config if generation_config is not None else self.generation_config
        kwargs["sparsity"] = self.config.sparsity_settings(
            **per_call_overrides(overrides, generation_config, self.generation_config)
        )
        if "max_cache_len" in kwargs and not GENERATION_CONFIG_HAS_MAX_CACHE_LEN:  # (honoured on every version)
            config = copy.deepcopy(config)
            config.max_cache_len = kwargs.pop("max_cache_len")
            generation_config = config
        given = kwargs.get(CACHE_KEY, kwargs.get("past_key_values"))
        self._check_generate_arguments(inputs, config, given, kwargs)
        call = _GenerateCall(cache=given, beams=_setting(kwargs, config, "num_beams", 1) > 1)
        token = _CURRENT_CALL.set(call)
        training = self.training
        if training:
            logger.warning_once(
                "generate() was called on a model in training mode: it runs in eval mode (no Gumbel noise, the sparse "
                "cache on) and the model is put back in training mode afterwards."
            )
            self.eval()
        try:
            return super().generate(inputs, generation_config, **kwargs)
        finally:
            _CURRENT_CALL.reset(token)
            if training:
                self.train()
            if is_dynamic_llava_cache(call.cache):
                call.cache.end_generation()
                if call.beams:
                    # its rows are the last running beams, not the returned sequences: continuing it would give a
                    # row another beam's history (stock caches share this), so it is refused from now on
                    call.cache.filled_by_beam_search = True

    def _check_generate_arguments(self, inputs: Any, config: Any, given: Any, kwargs: dict) -> None:
        """The combinations generate() cannot honour, refused before anything runs."""
        implementation = kwargs.get("cache_implementation", getattr(config, "cache_implementation", None))
        if implementation not in SUPPORTED_CACHE_IMPLEMENTATIONS:
            raise ValueError(
                f"cache_implementation={implementation!r} is not supported by Dynamic-LLaVA: its sparse layers need "
                "their own cache. Use cache_implementation='dynamic' (the default, DynamicLlavaCache) or 'static' "
                "(DynamicLlavaStaticCache, preallocated for torch.compile)."
            )
        if given is not None and implementation is not None:
            raise ValueError(
                f"Passing both cache_implementation={implementation!r} (which builds a cache) and a cache object is "
                "unsupported (stock generate() refuses it too): pass one of the two."
            )
        use_cache = kwargs.get("use_cache", getattr(config, "use_cache", True))
        if given is not None and use_cache is False and not GENERATE_CONTINUES_A_CACHE_WITHOUT_USE_CACHE:
            raise ValueError(
                f"generate(use_cache=False) with a cache passed in: the generate() of transformers "
                f"{transformers_version} cannot run this combination (the stock model fails too). Pass the cache and "
                "leave use_cache on, or drop the cache."
            )
        if given is not None:
            self._check_continuation(given, inputs, config, kwargs)
        chunk = kwargs.get("prefill_chunk_size", getattr(config, "prefill_chunk_size", None))
        if chunk and self.model.has_image_inputs(kwargs):
            # 5.x's generate() refuses this itself; 4.57's cut images across chunks and failed with a count error
            raise ValueError(
                f"prefill_chunk_size={chunk} with images: a prompt chunk cannot hold part of an image (the images are "
                "encoded with the chunk that holds their tokens). Pass prefill_chunk_size=None for prompts with "
                "images (chunking works for text-only prompts)."
            )

    def _check_continuation(self, cache: Any, inputs: Any, config: Any, kwargs: dict) -> None:
        """A filled cache continues the same rows, and generate() feeds only the tokens past it: the input must be the
        whole conversation so far plus new tokens (else transformers fails deep inside, differently per version)."""
        if not is_dynamic_llava_cache(cache) or cache.batch_size == 0:
            return  # an empty or foreign cache: _prepare_cache_for_generation builds, fills or refuses it
        self.model._check_cache_history(cache)
        given = inputs if inputs is not None else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        if given is None or given.dim() < 2:
            return
        rows, length = given.shape[0], given.shape[1]
        expand = max(_setting(kwargs, config, "num_beams", 1), _setting(kwargs, config, "num_return_sequences", 1))
        self.model._check_cache_rows(cache, rows, expand)
        if kwargs.get("use_cache", getattr(config, "use_cache", True)) is False:
            return  # stock's rule: the whole input is computed again
        cached = cache.get_seq_length()
        if length <= cached:
            # (5.x's generate() would feed the last cached token a second time: an answer unlike a fresh run's)
            raise ValueError(
                f"The cache already holds {cached} tokens per row but the input has {length}: with a filled cache, "
                "pass the whole conversation so far (the previous call's output sequences) followed by the new "
                "tokens; generate() feeds only the tokens past the cache. Or pass no cache to start over."
            )

    def _prepare_cache_for_generation(self, generation_config: Any, model_kwargs: dict, *args: Any, **kwargs: Any):
        """Build the Dynamic-LLaVA cache (growing, or static when asked); a given cache must be ours and fit."""
        model_kwargs["output_text_start"] = PROMPT_ONLY  # until the prompt has gone through
        settings = model_kwargs["sparsity"]
        call = _CURRENT_CALL.get()
        # (generate() passes max_length - 1: every token but the last generated one is fed)
        max_cache_length = args[2] if len(args) >= 3 else kwargs.get("max_cache_length", generation_config.max_length)
        given = model_kwargs.get(CACHE_KEY)
        if given is None and CACHE_KEY != "past_key_values":
            given = model_kwargs.pop("past_key_values", None)
        if given is not None:
            given = self.model._check_cache(given, settings)
            if given.is_preallocated:
                given.check_room(max_cache_length)
            batch_size = args[1] if len(args) >= 2 else kwargs.get("batch_size")
            expand = max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1)
            if expand > 1 and given.batch_size and given.batch_size == batch_size:
                given.batch_repeat_interleave(expand)  # each beam / returned sequence continues its row's history
            given.begin_generation()
            model_kwargs[CACHE_KEY] = given
        elif generation_config.use_cache is not False:
            sparse_layer = settings.cache_sparse_layer
            if generation_config.cache_implementation == "static":
                requested = getattr(generation_config, "max_cache_len", None) or 0
                model_kwargs[CACHE_KEY] = DynamicLlavaStaticCache(
                    self.config, max_cache_len=max(max_cache_length + 1, requested), sparse_layer=sparse_layer
                )
            else:
                model_kwargs[CACHE_KEY] = DynamicLlavaCache(self.config, sparse_layer=sparse_layer)
        if call is not None:
            call.cache = model_kwargs.get(CACHE_KEY)

    def _get_stopping_criteria(self, generation_config: Any, *args: Any, **kwargs: Any):
        """The stock criteria; outside beam search, the rows they stop are recorded in the cache (see
        `_StopRecorder`), so a row that stopped early changes nothing from there on."""
        criteria = super()._get_stopping_criteria(generation_config, *args, **kwargs)
        call = _CURRENT_CALL.get()
        if call is None or call.beams:
            return criteria  # (beam search never feeds a finished beam again)
        return _StopRecorder(criteria, call)

    def _prefill_chunking(self, input_ids: torch.Tensor, generation_config: Any, **model_kwargs: Any):
        """4.57's chunked prefill gives each chunk the positions of its cache columns, which are wrong for a
        left-padded row (the stock model shares it): positions come from the padding mask here, as unchunked.
        Goes with 4.57."""
        if CHUNKED_PREFILL_POSITIONS_FROM_CACHE:
            model_kwargs["dynamic_llava_positions_from_mask"] = True
        model_kwargs = super()._prefill_chunking(input_ids, generation_config, **model_kwargs)
        model_kwargs.pop("dynamic_llava_positions_from_mask", None)
        return model_kwargs

    def _update_model_kwargs_for_generation(self, outputs: Any, model_kwargs: dict, *args: Any, **kwargs: Any):
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        if model_kwargs.get("output_text_start") == PROMPT_ONLY and outputs.output_text_start is not None:
            model_kwargs["output_text_start"] = outputs.output_text_start  # generated text starts here
        return model_kwargs

    def _expand_inputs_for_generation(
        self, expand_size: int = 1, is_encoder_decoder: bool = False, input_ids: Any = None, **model_kwargs: Any
    ):
        """Beams and `num_return_sequences` repeat each row; a row's images are repeated as a group, in order (each
        image input is split into rows by `image_inputs_per_row` of the base adapter)."""
        if expand_size <= 1 or not self.model.has_image_inputs(model_kwargs):
            return super()._expand_inputs_for_generation(
                expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
            )
        ids = input_ids if input_ids is not None and input_ids.numel() else None  # (empty with inputs_embeds)
        rows = self.model.image_inputs_per_row(ids, model_kwargs.get("inputs_embeds"), model_kwargs)
        images = {}
        for name, per_row in rows.items():
            tensor = model_kwargs.pop(name)
            starts = [sum(per_row[:row]) for row in range(len(per_row))]
            index = [s + i for s, n in zip(starts, per_row, strict=True) for _ in range(expand_size) for i in range(n)]
            images[name] = tensor.index_select(0, torch.tensor(index, dtype=torch.long, device=tensor.device))
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        model_kwargs.update(images)
        return input_ids, model_kwargs

    def prepare_inputs_for_generation(
        self, input_ids: torch.Tensor, *args: Any, inputs_embeds: torch.Tensor | None = None, **kwargs: Any
    ) -> dict:
        """The stock inputs, plus the images of a chunk that holds image tokens on a later turn: transformers 4.57
        forwards image inputs only when the cache is empty (5.x on the first step of every call). Goes with 4.57.
        `inputs_embeds` is named so that generate() accepts it (it reads this signature), as stock models do."""
        from_mask = kwargs.pop("dynamic_llava_positions_from_mask", False)
        if from_mask and kwargs.get("attention_mask") is not None:
            # (4.57's chunked prefill: this chunk's positions from the padding mask, as the unchunked prefill's)
            mask = kwargs["attention_mask"].long()
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)[:, -input_ids.shape[1] :]
        inputs = super().prepare_inputs_for_generation(input_ids, *args, inputs_embeds=inputs_embeds, **kwargs)
        if not self.model.has_image_inputs(inputs) and self.model.has_image_inputs(kwargs):
            ids = inputs.get("input_ids")
            if ids is not None and ids.shape[1] > 1 and bool((ids == self.config.image_token_id).any()):
                for name in self._image_input_names:
                    if kwargs.get(name) is not None:
                        inputs[name] = kwargs[name]
        return inputs

    # the image inputs of a call, as generate() passes them (the base adapter names its own)
    _image_input_names: tuple[str, ...] = ("pixel_values", "image_sizes")
    # 4.57's generate() builds a 4D mask for a static cache with this function where a base defines it (LLaVA-NeXT
    # does): hidden, so that it asks `create_masks_for_generate` (ours: the 2D mask, padded) as for every base
    _prepare_4d_causal_attention_mask_with_cache_position = None

    def create_masks_for_generate(self, *args: Any, **kwargs: Any):
        """generate() asks compilable caches for a static-shape mask: ours is the 2D mask over the whole sequence,
        padded to the cache's columns (the same shape every step); the sparse and dense layers build theirs from it
        and their position tags."""
        attention_mask = kwargs.get("attention_mask")
        cache = kwargs.get(CACHE_KEY, kwargs.get("past_key_values"))
        if attention_mask is None or attention_mask.dim() != 2 or not getattr(cache, "is_preallocated", False):
            return attention_mask
        missing = cache.max_cache_len - attention_mask.shape[1]
        return torch.nn.functional.pad(attention_mask, (0, missing), value=1) if missing > 0 else attention_mask


@dataclass
class _GenerateCall:
    """One `generate()` call's link between its hooks: the cache it fills and whether it searches beams."""

    cache: Any = None
    beams: bool = False


# the generate() call running in this thread / task (its hooks find their cache here)
_CURRENT_CALL: ContextVar[_GenerateCall | None] = ContextVar("dynamic_llava_generate_call", default=None)


class _StopRecorder(StoppingCriteriaList):
    """The stock stopping criteria of one `generate()` call; after each step, the rows they stopped are recorded in
    the cache's `RowLog.stopped` (the next token such a row is fed is its last; then it is frozen)."""

    def __init__(self, criteria: StoppingCriteriaList, call: _GenerateCall):
        super().__init__(criteria)
        self.call = call

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        is_done = super().__call__(input_ids, scores, **kwargs)
        if is_dynamic_llava_cache(self.call.cache):
            self.call.cache.log.record_stops(is_done)
        return is_done


def _setting(kwargs: dict, config: Any, name: str, default: int) -> int:
    """An integer generation setting: the keyword argument, else the config's, else `default`."""
    value = kwargs.get(name)
    if value is None:
        value = getattr(config, name, None)
    return int(value or default)
