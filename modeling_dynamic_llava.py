"""Dynamic-LLaVA (ICLR 2025, arXiv 2412.00876) on the stock transformers LLaVA.

Split along transformers' own seam:

* `DynamicLlavaModel(LlavaModel)` merges the image features and runs the decoder with sparsification: the stock
  vision tower, projector, Llama decoder layers, rotary embedding and attention functions, plus the two predictors
  (`sparse_predictors.py`). The whole flow is one function, `DynamicLlavaModel.sparse_decoder_forward`, in numbered
  steps: dense layers, score and select at `sparse_layer`, drop, sparse layers.
* `DynamicLlavaForConditionalGeneration(LlavaForConditionalGeneration)` adds the LM head, the loss (with the
  keep-budget terms while training) and the `generate()` hooks that build the sparse cache.

The cache (`sparse_cache.DynamicLlavaCache`) holds the only state between calls; the model hands it one
`SparseChunk` per forward. Every transformers-version difference is in `transformers_compat.py`.

This file is a Hub remote-code module (flat imports only; nothing runs at import).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import LlavaForConditionalGeneration, LlavaModel
from transformers import __version__ as transformers_version
from transformers.cache_utils import Cache
from transformers.models.llava.modeling_llava import (
    LlavaCausalLMOutputWithPast,
    LlavaModelOutputWithPast,
    LlavaPreTrainedModel,
)
from transformers.utils import logging

from .configuration_dynamic_llava import PER_CALL_FIELDS, DynamicLlavaConfig, SparsitySettings
from .sparse_cache import DynamicLlavaCache, DynamicLlavaStaticCache, SparseChunk
from .sparse_masks import all_true, attention_mask_for, tags, visible_keys
from .sparse_predictors import ImageScorePredictor, OutputTextScorePredictor, run_predictor
from .sparse_training import (
    TRAINING_ATTENTION,
    answer_span,
    budget_loss,
    register_training_attention,
    straight_through_keep,
)
from .transformers_compat import (
    CACHE_KEY,
    GENERATE_CONTINUES_A_CACHE_WITHOUT_USE_CACHE,
    decoder_layer_kwargs,
    dense_causal_mask,
    image_features_list,
    keep_in_fp32_names,
    supported_generation_modes,
)

logger = logging.get_logger(__name__)

__all__ = [
    "DynamicLlavaCausalLMOutput",
    "DynamicLlavaForConditionalGeneration",
    "DynamicLlavaModel",
    "DynamicLlavaModelOutput",
]

# `output_text_start` before the prompt has been consumed: no column of the call is generated text
PROMPT_ONLY = sys.maxsize
# cache implementations generate() can build: ours, growing ("dynamic", the default) or preallocated ("static")
SUPPORTED_CACHE_IMPLEMENTATIONS = (None, "dynamic", "static")
# state-dict keys of exports made by dynamic-llava 0.1 (predictors at the top level) -> this layout
LEGACY_KEY_MAPPING = {
    r"^image_score_predictor": "model.image_score_predictor",
    r"^output_text_score_predictor": "model.output_text_score_predictor",
}
# the predictors stay float32 and out of bitsandbytes (named as each transformers version matches them)
_FP32_MODULES = keep_in_fp32_names(["image_score_predictor", "output_text_score_predictor"], parent="model")


# ---------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class DynamicLlavaModelOutput(LlavaModelOutputWithPast):
    """
    `LlavaModelOutputWithPast` plus what this call decided (`last_hidden_state` after the final norm).

    kept_vision_indices: per row, a list with one LongTensor per image of this call (kept indices inside the image,
        ascending); an empty list for a row without image.
    output_text_keep: `[batch, n]` bool keep decisions of the generated tokens scored in this call; None when none
        was scored.
    token_indices: `[batch, q']` index into this call's input of each hidden-state position (-1 = filler of a shorter
        row); None when the positions are the whole input.
    output_text_start: the column (index in the full sequence) from which the input is generated text, for the
        next call of `generate()`.
    vision_keep_ratio, output_text_keep_ratio, vision_budget_loss, output_text_budget_loss: training only.
    """

    kept_vision_indices: list | None = None
    output_text_keep: torch.Tensor | None = None
    token_indices: torch.Tensor | None = None
    output_text_start: int | None = None
    vision_keep_ratio: torch.Tensor | None = None
    output_text_keep_ratio: torch.Tensor | None = None
    vision_budget_loss: torch.Tensor | None = None
    output_text_budget_loss: torch.Tensor | None = None


@dataclass
class DynamicLlavaCausalLMOutput(LlavaCausalLMOutputWithPast):
    """
    `LlavaCausalLMOutputWithPast` plus what this call decided (see `DynamicLlavaModelOutput`), and in training the
    loss terms (`loss` = `ce_loss` + `mask_loss_weight` x (`vision_budget_loss` + `output_text_budget_loss`)).
    """

    kept_vision_indices: list | None = None
    output_text_keep: torch.Tensor | None = None
    token_indices: torch.Tensor | None = None
    output_text_start: int | None = None
    ce_loss: torch.Tensor | None = None
    vision_budget_loss: torch.Tensor | None = None
    output_text_budget_loss: torch.Tensor | None = None
    vision_keep_ratio: torch.Tensor | None = None
    output_text_keep_ratio: torch.Tensor | None = None


@dataclass
class ImageLayout:
    """Where this call's images are: `mask` `[batch, q]` bool at image tokens; `per_row` images per row (host ints);
    `tokens` tokens per image."""

    mask: torch.Tensor
    per_row: list[int]
    tokens: int

    @property
    def total_tokens(self) -> int:
        return sum(self.per_row) * self.tokens

    def flat_positions(self) -> torch.Tensor:
        """Flat indices (`[images * tokens]`) of the image tokens in `[batch * q]`, in order, without a host sync."""
        return torch.nonzero_static(self.mask.reshape(-1), size=self.total_tokens).squeeze(-1)

    def per_row_lists(self, kept: torch.Tensor | None) -> list[list[torch.Tensor]]:
        """`kept` `[images, k]` (None: every token kept) -> per row, a list with one LongTensor per image."""
        if kept is None:
            kept = torch.arange(self.tokens, device=self.mask.device).expand(sum(self.per_row), -1)
        images = list(kept.unbind(0))
        rows, start = [], 0
        for n in self.per_row:
            rows.append(images[start : start + n])
            start += n
        return rows


def _kept_vision(images: ImageLayout | None, kept: torch.Tensor | None, batch: int) -> list:
    return [[] for _ in range(batch)] if images is None else images.per_row_lists(kept)


@dataclass
class _Selection:
    """What step 2 decided for one chunk (`[batch, q]`, q = tokens of this call)."""

    store: torch.Tensor  # bool: keys/values enter the sparse layers' cache
    compute: torch.Tensor  # bool: the token runs through the sparse layers (store, plus the last token)
    kept_vision_indices: list
    output_text_keep: torch.Tensor | None = None  # [batch, n] decisions of the scored columns
    output_text_scored: torch.Tensor | None = None  # [batch, n] which of those were real tokens
    keep: torch.Tensor | None = None  # training: [batch, q] float straight-through keep mask
    vision_keep_ratio: torch.Tensor | None = None
    output_text_keep_ratio: torch.Tensor | None = None
    vision_budget_loss: torch.Tensor | None = None
    output_text_budget_loss: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------------------------------
# The model without head
# ---------------------------------------------------------------------------------------------------------------


class DynamicLlavaModel(LlavaModel):
    """`LlavaModel` whose decoder runs with Dynamic-LLaVA sparsification (see `sparse_decoder_forward`)."""

    config_class = DynamicLlavaConfig

    def __init__(self, config: DynamicLlavaConfig):
        super().__init__(config)
        hidden = config.text_config.hidden_size
        d = config.predictor_d_model
        self.image_score_predictor = ImageScorePredictor(
            hidden, d, config.predictor_nhead, config.predictor_dim_feedforward, config.predictor_num_layers
        )
        self.output_text_score_predictor = OutputTextScorePredictor(hidden, d)
        # Gumbel-softmax temperature while training (training.GumbelTemperatureCallback: 0.1 ** (step / max_steps))
        self.gumbel_tau = 1.0
        self.gumbel_noise = True

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
        eos_token_ids: torch.Tensor | None = None,
        vision_keep_tokens: int | None = None,
        vision_keep_rate: float | None = None,
        use_vision_predictor: bool | None = None,
        use_output_text_predictor: bool | None = None,
        **kwargs: Any,
    ) -> DynamicLlavaModelOutput:
        """
        Same arguments as `LlavaModel.forward` (the cache as `cache` or `past_key_values`), plus:

        labels: training only, to find each row's final answer span (the output-text mask covers it).
        output_text_start: the column of the full sequence from which tokens are generated text (scored by the
            output-text predictor and, when dropped, kept out of layers >= `sparse_layer`). `generate()` sets it.
            None: with a cache, a one-token call on a non-empty cache is a generated token; otherwise prompt.
        eos_token_ids: tokens that end a row; a row fed one of them while decoding is finished and changes nothing
            in the cache from there on. `generate()` sets it.
        vision_keep_tokens, vision_keep_rate, use_vision_predictor, use_output_text_predictor: this call's
            sparsity (None = the config's), validated like the config fields.
        """
        for unsupported in ("output_attentions", "output_hidden_states"):
            if kwargs.pop(unsupported, False):
                raise ValueError(f"DynamicLlavaForConditionalGeneration does not support {unsupported}=True yet.")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        settings = self.config.sparsity_settings(
            vision_keep_tokens=vision_keep_tokens,
            vision_keep_rate=vision_keep_rate,
            use_vision_predictor=use_vision_predictor,
            use_output_text_predictor=use_output_text_predictor,
        )
        cache = self._check_cache(cache if cache is not None else past_key_values, settings)
        training = self.training and settings.enabled
        if (
            cache is None
            and not training
            and (use_cache if use_cache is not None else self.config.text_config.use_cache)
        ):
            cache = DynamicLlavaCache(self.config, sparse_layer=settings.cache_sparse_layer)
        # a cache that is given is used and updated, whatever use_cache says (as the stock models do)

        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if cache is not None:
            self._check_cache_rows(cache, inputs_embeds.shape[0])
        if training and cache is not None:
            raise ValueError(
                "A model in training mode (sparsification on) runs without a cache: every token goes through every "
                "layer. Call model.eval() to decode with a cache."
            )
        images = None
        if pixel_values is None and input_ids is not None and input_ids.shape[1] > 1:
            count = int((input_ids == self.config.image_token_id).sum())  # (prompt chunks only: one host read)
            if count:
                raise ValueError(
                    f"The input holds {count} image tokens but no pixel_values: pass the images of this chunk "
                    "(the processor's pixel_values), or remove the <image> placeholders."
                )
        if pixel_values is not None:
            image_token_mask = self._image_token_mask(input_ids, inputs_embeds)
            if output_text_start is not None and cache is None:
                image_token_mask[:, output_text_start:] = False  # generated text is never an image
            inputs_embeds, images = self._merge_image_features(
                inputs_embeds,
                image_token_mask,
                pixel_values,
                vision_feature_layer,
                vision_feature_select_strategy,
                image_sizes,
                cache,
            )

        return self.sparse_decoder_forward(
            inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            images=images,
            settings=settings,
            input_ids=input_ids,
            labels=labels if training else None,
            output_text_start=output_text_start,
            eos_token_ids=eos_token_ids,
        )

    # ---- the sparsification flow --------------------------------------------------------------------------------

    def sparse_decoder_forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        cache: DynamicLlavaCache | None,
        images: ImageLayout | None,
        settings: SparsitySettings,
        input_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_text_start: int | None = None,
        eos_token_ids: torch.Tensor | None = None,
    ) -> DynamicLlavaModelOutput:
        """
        Run the Llama decoder with Dynamic-LLaVA sparsification (inference and training share it).

        Args:
            inputs_embeds: `[batch, q, H]` the chunk of this call (images already merged).
            attention_mask: `[batch, past + q]` 2D padding mask, or None.
            position_ids: `[batch, q]` original positions, or None (then `past .. past + q - 1`).
            cache: the cache (None: no cache).
            images: where this call's image tokens are (None: no image in this call).
            input_ids: `[batch, q]`, to tell end-of-sequence tokens (None with `inputs_embeds` only).
            labels: training only, `[batch, q]`.
        Returns:
            `DynamicLlavaModelOutput`: hidden states `[batch, q', H]` after the final norm (q' < q when tokens were
            dropped: `token_indices` maps them back), the cache, and this call's decisions.
        """
        lm = self.language_model
        num_layers = len(lm.layers)
        sparse_layer = settings.cache_sparse_layer if cache is None else cache.sparse_layer
        training = self.training and settings.enabled
        batch, q, _ = inputs_embeds.shape
        device = inputs_embeds.device
        static = hasattr(cache, "begin_dense")  # a preallocated cache: no host reads of its length
        past_length = cache.get_seq_length() if cache is not None and not static else 0
        position_ids = self._positions(position_ids, cache, static, past_length, batch, q, device)
        token_valid = self._token_valid(attention_mask, batch, q, past_length, cache, static, device)
        generated_from = self._generated_from(q, cache, static, past_length, output_text_start)
        token_valid, row_continues = self._finished_rows(
            token_valid, input_ids, eos_token_ids, generated_from, cache, output_text_start
        )

        # 1. dense layers 0..l-1: every token; the stock causal mask (a static cache: the position-tag rule)
        hidden = inputs_embeds
        if static:
            dense_keys = cache.begin_dense(position_ids, token_valid)
            dense_mask = attention_mask_for(
                visible_keys(dense_keys, position_ids, token_valid), lm.config._attn_implementation, hidden.dtype
            )
        else:
            dense_mask = dense_causal_mask(lm.config, inputs_embeds, attention_mask, cache, position_ids, past_length)
        rope = lm.rotary_emb(hidden, position_ids)
        dense_kwargs = decoder_layer_kwargs(dense_mask, position_ids, rope, cache, cache is not None, None)
        for layer in lm.layers[:sparse_layer]:
            hidden = layer(hidden, **dense_kwargs)
        if sparse_layer == num_layers:  # an all-dense cache (sparsification off): stock compute, bookkeeping only
            kept = _kept_vision(images, None, batch)
            if cache is not None:
                cache.admit(
                    SparseChunk(
                        token_valid=token_valid,
                        positions=position_ids,
                        valid=token_valid,
                        store=token_valid,
                        num_new_tokens=q,
                        kept_vision_indices=kept,
                        row_continues=row_continues,
                        is_prompt=generated_from is None,
                    )
                )
            return DynamicLlavaModelOutput(
                last_hidden_state=lm.norm(hidden),
                kept_vision_indices=kept,
                output_text_start=self._next_output_text_start(output_text_start, past_length, q, cache),
                **{CACHE_KEY: cache},
            )

        # 2. score the chunk at layer l: what is stored and what runs through the sparse layers
        if training:
            selection = self._training_selection(hidden, token_valid, images, settings, labels)
        else:
            selection = self._select(hidden, token_valid, images, settings, generated_from)

        # 3. drop: layers >= l compute only the selected tokens (right-aligned per row, one host sync for the width)
        token_indices, positions, valid, store = None, position_ids, token_valid, selection.store
        rows_full = q == 1 or training
        if not rows_full:
            counts = selection.compute.sum(-1)
            host = torch.stack([counts.max(), counts.min(), token_valid.all().long()]).tolist()
            width, shortest, no_padding = host
            rows_full = shortest == q
        if not rows_full:
            token_indices = _right_aligned_indices(selection.compute, width)
            gather = token_indices.clamp(min=0)
            hidden = hidden.gather(1, gather[..., None].expand(-1, -1, hidden.shape[-1]))
            positions = positions.gather(1, gather)
            valid = (token_indices >= 0) & token_valid.gather(1, gather)
            store = store.gather(1, gather) & valid
        plainly_causal = (
            not training
            and q > 1
            and lm.config._attn_implementation == "sdpa"
            and (cache is None or (cache.is_empty and not static))
            and bool(no_padding)
            and shortest == width
        )

        # 4. sparse layers: the kept past plus this chunk, one explicit mask for all of them (one hand-over)
        if cache is not None:
            chunk = SparseChunk(
                token_valid=token_valid,
                positions=positions,
                valid=valid,
                store=store,
                num_new_tokens=q,
                kept_vision_indices=selection.kept_vision_indices,
                output_text_keep=selection.output_text_keep,
                output_text_scored=selection.output_text_scored,
                row_continues=row_continues,
                is_prompt=generated_from is None,
            )
            key_positions = cache.admit(chunk, plainly_causal=plainly_causal)
        else:
            key_positions = tags(positions, valid)
        if plainly_causal:
            sparse_mask = None  # keys == queries in order: sdpa runs causal, with its flash / efficient kernels
        elif training:
            sparse_mask = visible_keys(key_positions, positions, valid)  # bool, for the masked softmax
        else:
            visible = visible_keys(key_positions, positions, None if q == 1 else valid)
            sparse_mask = attention_mask_for(visible, lm.config._attn_implementation, hidden.dtype)
        if token_indices is not None:
            rope = lm.rotary_emb(hidden, positions)
        sparse_kwargs = decoder_layer_kwargs(sparse_mask, positions, rope, cache, cache is not None, None)
        if training:
            sparse_kwargs["dynamic_llava_keep"] = selection.keep
        for layer in lm.layers[sparse_layer:]:
            hidden = layer(hidden, **sparse_kwargs)
        return DynamicLlavaModelOutput(
            last_hidden_state=lm.norm(hidden),
            kept_vision_indices=selection.kept_vision_indices,
            output_text_keep=selection.output_text_keep,
            token_indices=token_indices,
            output_text_start=self._next_output_text_start(output_text_start, past_length, q, cache),
            vision_keep_ratio=selection.vision_keep_ratio,
            output_text_keep_ratio=selection.output_text_keep_ratio,
            vision_budget_loss=selection.vision_budget_loss,
            output_text_budget_loss=selection.output_text_budget_loss,
            **{CACHE_KEY: cache},
        )

    def _select(
        self,
        hidden: torch.Tensor,
        token_valid: torch.Tensor,
        images: ImageLayout | None,
        settings: SparsitySettings,
        generated_from: int | None,
    ) -> _Selection:
        """Inference scoring at `sparse_layer`: image top-k per image, output-text threshold per generated token."""
        batch, q, _ = hidden.shape
        store = token_valid
        kept = None
        if images is not None and settings.use_vision_predictor:
            tokens = images.tokens
            positions = images.flat_positions().to(hidden.device)  # [images * tokens]
            image_hidden = hidden.reshape(-1, hidden.shape[-1])[positions].reshape(-1, tokens, hidden.shape[-1])
            logits = run_predictor(self.image_score_predictor, image_hidden)
            k = settings.image_keep_count(tokens)
            scores = logits.float().log_softmax(dim=-1)[..., 0]
            kept = scores.topk(k, dim=-1).indices.sort(dim=-1).values  # [images, k]
            image_keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, kept, True)
            flat = store.reshape(-1).clone()
            flat[positions] &= image_keep.reshape(-1)
            store = flat.reshape(batch, q)
        kept_vision = _kept_vision(images, kept, batch)

        output_text_keep = scored = None
        if settings.use_output_text_predictor and generated_from is not None:
            scored = token_valid if generated_from == 0 else token_valid[:, generated_from:]
            # keep iff logit 0 > logit 1 (strict, as the original); a decode step runs the predictor on `[batch, H]`
            if q == 1:
                logits = run_predictor(self.output_text_score_predictor, hidden[:, 0])
                output_text_keep = logits[:, :1] > logits[:, 1:]
            else:
                logits = run_predictor(self.output_text_score_predictor, hidden[:, generated_from:])
                output_text_keep = logits[..., 0] > logits[..., 1]
            if q == 1:
                store = output_text_keep  # (the cache keeps it only for a real token of a live row)
            elif generated_from == 0:
                store = store & output_text_keep
            else:
                store = torch.cat([store[:, :generated_from], store[:, generated_from:] & output_text_keep], dim=-1)

        if q == 1:
            return _Selection(store, store, kept_vision, output_text_keep, scored)  # (the token always computes)
        compute = store.clone()
        compute[:, -1] = True  # the current token always computes
        return _Selection(store, compute, kept_vision, output_text_keep, scored)

    def _training_selection(
        self,
        hidden: torch.Tensor,
        token_valid: torch.Tensor,
        images: ImageLayout | None,
        settings: SparsitySettings,
        labels: torch.Tensor | None,
    ) -> _Selection:
        """
        Training scoring at `sparse_layer` (no token removed): straight-through Gumbel keep masks for every image
        token and for the final answer span of answers >= `output_text_len_for_training`, and the budget terms.
        """
        config = self.config
        batch, q, _ = hidden.shape
        keep = token_valid.float()  # padding columns are never kept
        zero = hidden.new_zeros((), dtype=torch.float32)
        selection = _Selection(
            store=token_valid,
            compute=torch.ones_like(token_valid),
            kept_vision_indices=[[] for _ in range(batch)],
            vision_budget_loss=zero,
            output_text_budget_loss=zero,
        )
        if settings.use_vision_predictor and images is not None:
            tokens = images.tokens
            positions = images.flat_positions().to(hidden.device)
            image_hidden = hidden.reshape(-1, hidden.shape[-1])[positions].reshape(-1, tokens, hidden.shape[-1])
            logits = run_predictor(self.image_score_predictor, image_hidden)
            image_keep = straight_through_keep(logits, self.gumbel_tau, self.gumbel_noise)  # [images, T]
            keep = keep.reshape(-1).index_put((positions,), image_keep.reshape(-1)).reshape(batch, q)
            ratio = image_keep.mean(dim=-1)
            selection.vision_budget_loss = budget_loss(settings.vision_keep_rate, ratio)
            selection.vision_keep_ratio = ratio.mean()
        if settings.use_output_text_predictor and labels is not None:
            start, end = answer_span(labels.to(hidden.device), token_valid)
            columns = torch.arange(q, device=hidden.device)[None]
            span = (columns >= start[:, None]) & (columns < end[:, None])
            length = (end - start).clamp(min=1)
            long_answer = (end - start) >= config.output_text_len_for_training
            logits = run_predictor(self.output_text_score_predictor, hidden)
            text_keep = straight_through_keep(logits, self.gumbel_tau, self.gumbel_noise)  # [B, q]
            keep = torch.where(span & long_answer[:, None], keep * text_keep, keep)
            row_ratio = (text_keep * span).sum(-1) / length
            target = torch.where(long_answer, torch.full_like(row_ratio, config.output_text_keep_rate), row_ratio)
            selection.output_text_budget_loss = budget_loss(target.detach(), row_ratio)
            selection.output_text_keep_ratio = row_ratio[long_answer].mean() if bool(long_answer.any()) else None
        selection.keep = keep
        return selection

    # ---- inputs --------------------------------------------------------------------------------------------------

    def _check_cache(self, cache: Any, settings: SparsitySettings) -> DynamicLlavaCache | None:
        """A given cache must be a Dynamic-LLaVA cache built for this model's layers and sparse layer."""
        if cache is None:
            return None
        if not (hasattr(cache, "admit") and hasattr(cache, "sparse_layer")):
            filled = cache.get_seq_length() if hasattr(cache, "get_seq_length") else "?"
            raise TypeError(
                f"DynamicLlavaForConditionalGeneration needs its own cache, got a {type(cache).__name__} holding "
                f"{filled} tokens. Pass no cache (generate() and forward() build one), or "
                "DynamicLlavaCache(model.config) (filled in place, for multi-turn), or the cache returned by an "
                "earlier call of this model."
            )
        num_layers = self.config.text_config.num_hidden_layers
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
    def _check_cache_rows(cache: DynamicLlavaCache, rows: int, expand: int = 1) -> None:
        """A filled cache continues the same `rows` (or `rows * expand`, once generate() repeats them for beams or
        `num_return_sequences`); an empty one takes any."""
        if cache.batch_size not in (0, rows, rows * expand):
            raise ValueError(
                f"The cache holds {cache.batch_size} rows but this call has {rows}. A cache continues the same rows: "
                "pass the rows it was filled with (in the same order), or no cache to start over."
            )

    @staticmethod
    def _positions(position_ids, cache, static, past_length, batch, q, device) -> torch.Tensor:
        if position_ids is None:
            start = cache.length if static and cache.length is not None else past_length
            position_ids = torch.arange(q, device=device) + start
            return position_ids.expand(batch, q)
        if position_ids.dim() != 2 or position_ids.shape[-1] != q:
            raise ValueError(f"position_ids has shape {tuple(position_ids.shape)}; expected [batch, {q}].")
        return position_ids.expand(batch, q) if position_ids.shape[0] != batch else position_ids

    @staticmethod
    def _token_valid(attention_mask, batch, q, past_length, cache, static, device) -> torch.Tensor:
        """`[batch, q]` bool, the real tokens of this call (from the 2D padding mask). Never written to."""
        if attention_mask is None:
            return all_true(batch, q, device)
        if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] < q:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; this call needs a 2D mask "
                f"[batch={batch}, past + q] with q={q} new tokens (1 = real token, 0 = padding)."
            )
        if not static and cache is not None and attention_mask.shape[1] != past_length + q:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[1]} tokens, but the cache holds {past_length} and this "
                f"call adds {q}: pass the mask of the whole sequence [batch, {past_length + q}]."
            )
        return attention_mask[:, -q:].to(device=device, dtype=torch.bool)

    @staticmethod
    def _generated_from(q, cache, static, past_length, output_text_start) -> int | None:
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

    @staticmethod
    def _finished_rows(token_valid, input_ids, eos_token_ids, generated_from, cache, output_text_start):
        """
        Rows that were fed an end-of-sequence token while generating are finished: generate() pads them from there
        on, and nothing of theirs may change what they report (as if each row ran alone).

        Returns:
            token_valid with finished tokens cleared (no cache: the generated tokens from each row's first EOS on),
            and `[batch]` bool `row_continues` for the cache (False: this decode step feeds EOS), or None.
        """
        if eos_token_ids is None or input_ids is None or generated_from is None:
            return token_valid, None
        eos = eos_token_ids if eos_token_ids.device == input_ids.device else eos_token_ids.to(input_ids.device)
        if cache is not None:
            if input_ids.shape[1] != 1:
                return token_valid, None
            continues = torch.isin(input_ids[:, 0], eos, invert=True)
            return token_valid, continues if continues.device == token_valid.device else continues.to(
                token_valid.device
            )
        is_eos = torch.isin(input_ids, eos)
        is_eos[:, :generated_from] = False
        finished = is_eos.cumsum(-1) > 0
        return token_valid & ~finished, None

    @staticmethod
    def _next_output_text_start(output_text_start, past_length, q, cache) -> int | None:
        """The column where generated text starts, for the next call: generate() passes PROMPT_ONLY until the
        prompt has gone through; a manual call without a cache gets its own length (what to pass back)."""
        if output_text_start is None:
            return q if cache is None else None
        if output_text_start != PROMPT_ONLY:
            return output_text_start
        if hasattr(cache, "begin_dense"):
            return cache.get_seq_length()  # (after the prompt: eager, one host read)
        return past_length + q

    def _image_token_mask(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor) -> torch.Tensor:
        token_id = self.config.image_token_id
        if input_ids is not None:
            return input_ids == token_id
        embedding = self.get_input_embeddings()(torch.tensor(token_id, device=inputs_embeds.device))
        return (inputs_embeds == embedding).all(-1)

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

    def _merge_image_features(
        self, inputs_embeds, image_token_mask, pixel_values, feature_layer, select_strategy, image_sizes, cache
    ) -> tuple[torch.Tensor, ImageLayout | None]:
        """Check the image tokens against `pixel_values` (one host sync), encode, and put the features in place.
        Returns the embeddings and where the images are (None when the call has no image token: pixel_values of an
        earlier turn, warned and not used)."""
        vision = self.config.vision_config
        expected = (vision.num_channels, vision.image_size, vision.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)}; this model expects [num_images, "
                f"{expected[0]}, {expected[1]}, {expected[2]}]. Preprocess images with the model's processor "
                "(AutoProcessor.from_pretrained(...)) and pass one image per <image> token."
            )
        per_image = self.config.tokens_per_image
        per_row = image_token_mask.sum(-1).tolist()
        total = sum(per_row)
        if total == 0 and cache is not None and not cache.is_empty:
            logger.warning_once(
                "pixel_values were passed with a chunk that has no image token and a filled cache: the images of an "
                "earlier turn are already in the cache, so these pixel_values are not used."
            )
            return inputs_embeds, None
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
        layout = ImageLayout(image_token_mask, [n // per_image for n in per_row], per_image)
        tower = self.vision_tower
        tower_dtype = tower.dtype if tower.dtype.is_floating_point else pixel_values.dtype  # (quantized towers)
        self._check_image_sizes(image_sizes, pixel_values.shape[0], vision.image_size)
        out = self.get_image_features(
            pixel_values=pixel_values.to(tower_dtype),
            vision_feature_layer=feature_layer if feature_layer is not None else self.config.vision_feature_layer,
            vision_feature_select_strategy=select_strategy
            if select_strategy is not None
            else self.config.vision_feature_select_strategy,
        )
        features = torch.cat(image_features_list(out), dim=0)
        merged = inputs_embeds.masked_scatter(
            image_token_mask[..., None].to(inputs_embeds.device), features.to(inputs_embeds)
        )
        return merged, layout


def _right_aligned_indices(compute: torch.Tensor, width: int) -> torch.Tensor:
    """
    `compute` `[batch, q]` bool -> `[batch, width]` long indices of the True entries, right-aligned per row (so the
    last position is each row's current token), -1 in the filler slots on the left; `width` = max True count.
    """
    counts = compute.sum(-1)
    dest = compute.long().cumsum(-1) - 1 + (width - counts)[:, None]
    dest = torch.where(compute, dest, torch.full_like(dest, width))
    out = torch.full((compute.shape[0], width + 1), -1, dtype=torch.long, device=compute.device)
    source = torch.arange(compute.shape[1], device=compute.device).expand_as(dest)
    out.scatter_(1, dest, source)
    return out[:, :width]


# ---------------------------------------------------------------------------------------------------------------
# The model with the LM head
# ---------------------------------------------------------------------------------------------------------------


class DynamicLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """`LlavaForConditionalGeneration` on a `DynamicLlavaModel`, with the sparse cache built by `generate()`."""

    config_class = DynamicLlavaConfig
    # generate() must not make a DynamicCache for us (4.57), and assisted decoding (needs crop) is refused
    _is_stateful = True
    _no_split_modules = ["LlamaDecoderLayer", "CLIPEncoderLayer", "ImageScorePredictor", "OutputTextScorePredictor"]
    # float32 and never quantized: their top-k / threshold decisions are cut at margins half precision can flip
    _keep_in_fp32_modules = _FP32_MODULES
    _keep_in_fp32_modules_strict = _FP32_MODULES
    _skip_keys_device_placement = ["past_key_values", "cache"]
    # the sparse layers need a 4D mask over (kept past + chunk): flash-attention (2D masks only) and flex attention
    # are refused by from_pretrained with transformers' own message; sdpa and eager are supported
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = False
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
        text = self.config.text_config
        if mode and self.config.sparsification_enabled and text._attn_implementation != TRAINING_ATTENTION:
            register_training_attention()
            self._inference_attn_implementation = text._attn_implementation
            text._attn_implementation = TRAINING_ATTENTION
        elif not mode and text._attn_implementation == TRAINING_ATTENTION:
            text._attn_implementation = getattr(self, "_inference_attn_implementation", "sdpa")
        return self

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
        eos_token_ids: torch.Tensor | None = None,
        vision_keep_tokens: int | None = None,
        vision_keep_rate: float | None = None,
        use_vision_predictor: bool | None = None,
        use_output_text_predictor: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> DynamicLlavaCausalLMOutput | tuple:
        """
        Same arguments as `LlavaForConditionalGeneration.forward` (the cache as `cache` or `past_key_values`), plus
        the sparsity arguments of `DynamicLlavaModel.forward` (`output_text_start`, `eos_token_ids`,
        `vision_keep_tokens`, `vision_keep_rate`, `use_vision_predictor`, `use_output_text_predictor`).

        Returns a `DynamicLlavaCausalLMOutput` (the Llava output plus this call's decisions; a tuple with
        `return_dict=False`). A given cache must be a `DynamicLlavaCache` (`generate()` builds one by itself).
        """
        kwargs.pop("cache_position", None)  # positions come from position_ids / the cache's logical length
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
            eos_token_ids=eos_token_ids,
            vision_keep_tokens=vision_keep_tokens,
            vision_keep_rate=vision_keep_rate,
            use_vision_predictor=use_vision_predictor,
            use_output_text_predictor=use_output_text_predictor,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])

        loss = ce = None
        if labels is not None:
            if outputs.token_indices is not None:
                gathered = labels.gather(1, outputs.token_indices.clamp(min=0).to(labels.device))
                labels = gathered.masked_fill(outputs.token_indices.to(labels.device) < 0, -100)
            ce = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size)
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

    # ---- generate() integration ---------------------------------------------------------------------------------

    def generate(self, inputs: torch.Tensor | None = None, generation_config: Any = None, **kwargs: Any):
        """
        `GenerationMixin.generate`, plus the per-call sparsity arguments (`vision_keep_tokens`, `vision_keep_rate`,
        `use_vision_predictor`, `use_output_text_predictor`; validated before anything runs) and
        `cache_implementation` "dynamic" (default) or "static" (`DynamicLlavaStaticCache`, for compiled decoding).
        A model in training mode generates in eval mode (and is put back).
        """
        self.config.sparsity_settings(**{field: kwargs.get(field) for field in PER_CALL_FIELDS})
        implementation = kwargs.get("cache_implementation")
        if implementation is None:
            config = generation_config if generation_config is not None else self.generation_config
            implementation = getattr(config, "cache_implementation", None)
        given = kwargs.get(CACHE_KEY, kwargs.get("past_key_values"))
        if given is not None and kwargs.get("use_cache") is False and not GENERATE_CONTINUES_A_CACHE_WITHOUT_USE_CACHE:
            raise ValueError(
                f"generate(use_cache=False) with a cache passed in: the generate() of transformers "
                f"{transformers_version} cannot run this combination (the stock LLaVA fails too). Pass the cache and "
                "leave use_cache on, or drop the cache."
            )
        if given is not None:
            self._check_continuation(given, inputs, generation_config, kwargs)
        chunk = kwargs.get(
            "prefill_chunk_size", getattr(generation_config or self.generation_config, "prefill_chunk_size", None)
        )
        if chunk and kwargs.get("pixel_values") is not None:
            # 5.x's generate() refuses this itself; 4.57's cut images across chunks and failed with a count error
            raise ValueError(
                f"prefill_chunk_size={chunk} with pixel_values: a prompt chunk cannot hold part of an image (the "
                "images are encoded with the chunk that holds their tokens). Pass prefill_chunk_size=None for prompts "
                "with images (chunking works for text-only prompts)."
            )
        if implementation not in SUPPORTED_CACHE_IMPLEMENTATIONS:
            raise ValueError(
                f"cache_implementation={implementation!r} is not supported by Dynamic-LLaVA: its sparse layers need "
                "their own cache. Use cache_implementation='dynamic' (the default, DynamicLlavaCache) or 'static' "
                "(DynamicLlavaStaticCache, preallocated for torch.compile)."
            )
        if not self.training:
            return super().generate(inputs, generation_config, **kwargs)
        logger.warning_once(
            "generate() was called on a model in training mode: it runs in eval mode (no Gumbel noise, the sparse "
            "cache on) and the model is put back in training mode afterwards."
        )
        self.eval()
        try:
            return super().generate(inputs, generation_config, **kwargs)
        finally:
            self.train()

    def _check_continuation(self, cache: Any, inputs: Any, generation_config: Any, kwargs: dict) -> None:
        """A filled cache continues the same rows, and generate() feeds only the tokens past it: the input must be the
        whole conversation so far plus new tokens (else transformers fails deep inside, differently per version)."""
        if not (hasattr(cache, "admit") and hasattr(cache, "batch_size")) or cache.batch_size == 0:
            return  # an empty or foreign cache: _prepare_cache_for_generation builds, fills or refuses it
        given = inputs if inputs is not None else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        if given is None or given.dim() < 2:
            return
        rows, length = given.shape[0], given.shape[1]
        config = generation_config if generation_config is not None else self.generation_config
        expand = max(
            int(kwargs.get("num_beams") or getattr(config, "num_beams", 1) or 1),
            int(kwargs.get("num_return_sequences") or getattr(config, "num_return_sequences", 1) or 1),
        )
        self.model._check_cache_rows(cache, rows, expand)
        if kwargs.get("use_cache", getattr(config, "use_cache", True)) is False:
            return  # stock's rule: the whole input is computed again (item 7 of issue 15)
        cached = cache.get_seq_length()
        if length <= cached:
            # (5.x's generate() would feed the last cached token a second time: an answer unlike a fresh run's)
            raise ValueError(
                f"The cache already holds {cached} tokens per row but the input has {length}: with a filled cache, "
                "pass the whole conversation so far (the previous call's output sequences) followed by the new "
                "tokens; generate() feeds only the tokens past the cache. Or pass no cache to start over."
            )

    def _prepare_cache_for_generation(self, generation_config: Any, model_kwargs: dict, *args: Any, **kwargs: Any):
        """Build the Dynamic-LLaVA cache (growing, or static when asked); a given cache must be ours."""
        model_kwargs["output_text_start"] = PROMPT_ONLY  # until the prompt has gone through
        eos = getattr(generation_config, "_eos_token_tensor", None)
        if eos is None and generation_config.eos_token_id is not None:
            eos = torch.as_tensor(generation_config.eos_token_id).reshape(-1)
        model_kwargs["eos_token_ids"] = None if eos is None else eos.reshape(-1)
        settings = self.config.sparsity_settings(**{field: model_kwargs.get(field) for field in PER_CALL_FIELDS})
        given = model_kwargs.get(CACHE_KEY)
        if given is None and CACHE_KEY != "past_key_values":
            given = model_kwargs.pop("past_key_values", None)
        if given is not None:
            model_kwargs[CACHE_KEY] = self.model._check_cache(given, settings)
            return
        if generation_config.use_cache is False:
            return
        sparse_layer = settings.cache_sparse_layer
        if generation_config.cache_implementation == "static":
            max_cache_len = args[2] if len(args) >= 3 else kwargs.get("max_cache_length", generation_config.max_length)
            model_kwargs[CACHE_KEY] = DynamicLlavaStaticCache(
                self.config, max_cache_len=max_cache_len + 1, sparse_layer=sparse_layer
            )
        else:
            model_kwargs[CACHE_KEY] = DynamicLlavaCache(self.config, sparse_layer=sparse_layer)

    def _update_model_kwargs_for_generation(self, outputs: Any, model_kwargs: dict, *args: Any, **kwargs: Any):
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        if model_kwargs.get("output_text_start") == PROMPT_ONLY and outputs.output_text_start is not None:
            model_kwargs["output_text_start"] = outputs.output_text_start  # generated text starts here
        return model_kwargs

    def _expand_inputs_for_generation(
        self, expand_size: int = 1, is_encoder_decoder: bool = False, input_ids: Any = None, **model_kwargs: Any
    ):
        """Beams and `num_return_sequences` repeat each row; a row's images are repeated as a group, in order."""
        pixel_values = model_kwargs.get("pixel_values")
        if expand_size > 1 and pixel_values is not None:
            mask = self.model._image_token_mask(input_ids, model_kwargs.get("inputs_embeds"))
            per_row = (mask.sum(-1) // self.config.tokens_per_image).tolist()
            starts = [sum(per_row[:row]) for row in range(len(per_row))]
            index = [
                start + i
                for start, n in zip(starts, per_row, strict=True)
                for _ in range(expand_size)
                for i in range(n)
            ]
            index = torch.tensor(index, dtype=torch.long, device=pixel_values.device)
            images = {"pixel_values": pixel_values.index_select(0, index)}
            if model_kwargs.get("image_sizes") is not None:
                images["image_sizes"] = model_kwargs["image_sizes"].index_select(
                    0, index.to(model_kwargs["image_sizes"].device)
                )
            for key in images:
                model_kwargs.pop(key)
            input_ids, model_kwargs = super()._expand_inputs_for_generation(
                expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
            )
            model_kwargs.update(images)
            return input_ids, model_kwargs
        return super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )

    def prepare_inputs_for_generation(
        self, input_ids: torch.Tensor, *args: Any, inputs_embeds: torch.Tensor | None = None, **kwargs: Any
    ) -> dict:
        """The stock inputs, plus the images of a chunk that holds image tokens on a later turn: transformers 4.57
        forwards `pixel_values` only when the cache is empty (5.x on the first step of every call). Goes with 4.57.
        `inputs_embeds` is named so that generate() accepts it (it reads this signature), as stock LLaVA does."""
        inputs = super().prepare_inputs_for_generation(input_ids, *args, inputs_embeds=inputs_embeds, **kwargs)
        if inputs.get("pixel_values") is None and kwargs.get("pixel_values") is not None:
            ids = inputs.get("input_ids")
            if ids is not None and ids.shape[1] > 1 and bool((ids == self.config.image_token_id).any()):
                inputs["pixel_values"] = kwargs["pixel_values"]
                if kwargs.get("image_sizes") is not None:
                    inputs["image_sizes"] = kwargs["image_sizes"]
        return inputs

    def create_masks_for_generate(self, *args: Any, **kwargs: Any):
        """generate() asks compilable caches for a static-shape mask: ours reads padding from its position tags, so
        a decode step needs none (prefill chunks keep their 2D mask)."""
        embeds = kwargs.get("inputs_embeds", kwargs.get("input_embeds"))
        attention_mask = kwargs.get("attention_mask")
        if embeds is not None and embeds.shape[1] == 1:
            return None
        return attention_mask
