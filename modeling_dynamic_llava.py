"""Dynamic-LLaVA (ICLR 2025, arXiv 2412.00876) on the stock transformers LLaVA.

The vision tower, projector, Llama decoder layers, rotary embedding and attention functions are the stock ones
(same state-dict keys as `LlavaForConditionalGeneration`). Two small predictors are added:

* `image_score_predictor` scores each image token entering layer `sparse_layer`; at prefill the top
  `int(num_image_tokens * vision_keep_rate)` per image are kept, the rest never reach layers `>= sparse_layer`.
* `output_text_score_predictor` scores each generated token when it is fed back; its keys/values enter the cache of
  layers `>= sparse_layer` only if `logit[0] > logit[1]`.

The whole flow (score, select, drop) is `DynamicLlavaForConditionalGeneration.sparse_decoder_forward`. The cache
(`DynamicLlavaCache`) holds the only state between calls.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import LlavaForConditionalGeneration
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast

from .configuration_dynamic_llava import DynamicLlavaConfig
from .sparse_cache import DynamicLlavaCache
from .sparse_training import TRAINING_ATTENTION, answer_span, register_training_attention, straight_through_keep

__all__ = [
    "DynamicLlavaForConditionalGeneration",
    "DynamicLlavaCausalLMOutput",
    "ImageScorePredictor",
    "OutputTextScorePredictor",
]

IS_V5 = int(transformers.__version__.split(".")[0]) >= 5
# The cache argument and output field: `past_key_values` up to transformers 5.23, `cache` from 5.24.
CACHE_KEY = "cache" if "cache" in LlavaCausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
# transformers 4.57's masks and decoder layers take `cache_position` (and the mask `input_embeds`); 5.x derive it.
_MASK_PARAMETERS = inspect.signature(create_causal_mask).parameters
NEEDS_CACHE_POSITION = "cache_position" in _MASK_PARAMETERS
_MASK_EMBEDS_KEY = "inputs_embeds" if "inputs_embeds" in _MASK_PARAMETERS else "input_embeds"


# ---------------------------------------------------------------------------------------------------------------
# Predictors (module and parameter names as in the original checkpoints, so converted weights load by name)
# ---------------------------------------------------------------------------------------------------------------


class PredictorAttention(nn.Module):
    """Full multi-head self-attention over one image's tokens: no mask, no positions, scale 1/sqrt(d/nhead)."""

    def __init__(self, d_model: int, nhead: int):
        super().__init__()
        self.nhead = nhead
        self.scale = (d_model // nhead) ** -0.5
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: `[images, tokens, d]` -> `[images, tokens, d]`."""
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.nhead, d // self.nhead).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class PredictorMlp(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PredictorBlock(nn.Module):
    """Pre-norm ViT block of width d (no layer scale)."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model, eps=1e-5)
        self.attn = PredictorAttention(d_model, nhead)
        self.norm2 = nn.LayerNorm(d_model, eps=1e-5)
        self.mlp = PredictorMlp(d_model, int(d_model * (dim_feedforward / d_model)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ImageScorePredictor(nn.Module):
    """
    Scores the tokens of one image from the hidden states entering layer `sparse_layer`.

    down_mlp (LayerNorm -> Linear(H, d) -> GELU) -> `num_layers` ViT blocks -> local/global mix (first d/2 channels
    per token, mask-weighted mean of the last d/2 over the image) -> output_mlp (d -> d/2 -> d/4 -> 2).
    Index 0 of the two logits means keep.
    """

    def __init__(self, hidden_size: int, d_model: int, nhead: int, dim_feedforward: int, num_layers: int):
        super().__init__()
        self.down_mlp = nn.Sequential(nn.LayerNorm(hidden_size, eps=1e-5), nn.Linear(hidden_size, d_model), nn.GELU())
        self.transformer = nn.ModuleList(
            [PredictorBlock(d_model, nhead, dim_feedforward) for _ in range(num_layers)]
        )
        self.output_mlp = nn.Sequential(
            nn.Linear(d_model, d_model // 2),
            nn.GELU(),
            nn.Linear(d_model // 2, d_model // 4),
            nn.GELU(),
            nn.Linear(d_model // 4, 2),
        )

    def forward(self, hidden_states: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Args:
            hidden_states: `[images, tokens, H]`, each image's tokens as they enter layer `sparse_layer`.
            mask: `[images, tokens]` keep mask (training); None means all ones (inference).
        Returns:
            `[images, tokens, 2]` logits, index 0 = keep.
        """
        x = self.down_mlp(hidden_states)
        if mask is None:
            mask = x.new_ones(x.shape[:-1])
        mask = mask.to(x.dtype)[..., None]
        x = x * mask
        for block in self.transformer:
            x = block(x)
        local_x, global_x = x.chunk(2, dim=-1)
        global_x = (global_x * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True)
        x = torch.cat([local_x, global_x.expand_as(local_x)], dim=-1)
        return self.output_mlp(x)


class OutputTextScorePredictor(nn.Module):
    """Per-token MLP: LayerNorm(H) -> Linear(H, d) -> GELU -> d/2 -> GELU -> d/4 -> GELU -> 2 (index 0 = keep)."""

    def __init__(self, hidden_size: int, d_model: int):
        super().__init__()
        self.output_mlp = nn.Sequential(
            nn.LayerNorm(hidden_size, eps=1e-5),
            nn.Linear(hidden_size, d_model),
            nn.GELU(),
            nn.Linear(d_model, d_model // 2),
            nn.GELU(),
            nn.Linear(d_model // 2, d_model // 4),
            nn.GELU(),
            nn.Linear(d_model // 4, 2),
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`[..., H]` -> `[..., 2]` logits."""
        return self.output_mlp(hidden_states)


# ---------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class DynamicLlavaCausalLMOutput(LlavaCausalLMOutputWithPast):
    """
    `LlavaCausalLMOutputWithPast` plus what this call decided.

    kept_vision_indices: per row, a list with one LongTensor per image of this call (kept indices inside the image,
        ascending); None when the call had no image.
    output_text_keep: `[batch, n]` bool keep decisions of the generated tokens scored in this call (one per decode
        step with a cache; every generated token without one); None when none was scored.
    token_indices: `[batch, q']` index into this call's input of each logits position (-1 = filler of a shorter
        row); None when the logits cover every input position.
    output_text_start: without a cache, the index from which the input is generated text (what `generate()` passes
        back on the next step); None with a cache.
    """

    kept_vision_indices: Optional[list] = None
    output_text_keep: Optional[torch.Tensor] = None
    token_indices: Optional[torch.Tensor] = None
    output_text_start: Optional[int] = None
    # training (model.train()): the loss terms, for logging, and the keep ratios of the straight-through masks
    ce_loss: Optional[torch.Tensor] = None
    vision_budget_loss: Optional[torch.Tensor] = None
    output_text_budget_loss: Optional[torch.Tensor] = None
    vision_keep_ratio: Optional[torch.Tensor] = None
    output_text_keep_ratio: Optional[torch.Tensor] = None


@dataclass
class _Selection:
    """What the predictors decided for one chunk (all `[batch, q]`, q = tokens of this call)."""

    store: torch.Tensor  # keys/values enter the sparse layers' cache
    compute: torch.Tensor  # token runs through the sparse layers (store, plus the last token)
    kept_vision_indices: Optional[list] = None
    output_text_keep: Optional[torch.Tensor] = None


# ---------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------


class DynamicLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    config_class = DynamicLlavaConfig
    # generate() must not make a DynamicCache for us (4.57), and assisted decoding (needs crop) is refused
    _is_stateful = True
    _no_split_modules = ["LlamaDecoderLayer", "CLIPEncoderLayer", "ImageScorePredictor", "OutputTextScorePredictor"]
    # The predictors stay in float32 under float16/bfloat16 loads and out of bitsandbytes quantization: they are
    # tiny, and their top-k / threshold decisions are cut at margins that half precision can flip (the original
    # ran them in fp16). Their input is cast to their dtype (_run_predictor).
    _keep_in_fp32_modules = ["image_score_predictor", "output_text_score_predictor"]
    _keep_in_fp32_modules_strict = ["image_score_predictor", "output_text_score_predictor"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    # the sparse layers need a 4D mask over (kept past + chunk): flash-attention (2D masks only) and flex attention
    # are refused by from_pretrained with transformers' own message; sdpa and eager are supported
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = False

    if IS_V5:
        from transformers.generation.utils import GenerationMode as _GM

        _supported_generation_modes = [_GM.GREEDY_SEARCH, _GM.SAMPLE, _GM.BEAM_SEARCH, _GM.BEAM_SAMPLE]
        del _GM

    def __init__(self, config: DynamicLlavaConfig):
        super().__init__(config)
        hidden = config.text_config.hidden_size
        d = config.predictor_d_model
        self.image_score_predictor = ImageScorePredictor(
            hidden, d, config.predictor_nhead, config.predictor_dim_feedforward, config.predictor_num_layers
        )
        self.output_text_score_predictor = OutputTextScorePredictor(hidden, d)
        # Gumbel-softmax temperature while training (tools.train.GumbelTemperatureCallback: 0.1 ** (step / max_steps))
        self.gumbel_tau = 1.0
        self.gumbel_noise = True
        self.post_init()

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

    def post_init(self):
        # LlavaForConditionalGeneration.__init__ calls post_init() before the predictors exist; 4.57 then rejects
        # `_keep_in_fp32_modules`. Run it once, when they do.
        if hasattr(self, "output_text_score_predictor"):
            super().post_init()

    # ---- entry points (explicit signatures: generate() inspects them) ------------------------------------------

    if CACHE_KEY == "cache":

        def forward(
            self,
            input_ids: Optional[torch.LongTensor] = None,
            pixel_values: Optional[torch.FloatTensor] = None,
            attention_mask: Optional[torch.Tensor] = None,
            position_ids: Optional[torch.LongTensor] = None,
            cache: Optional[Cache] = None,
            inputs_embeds: Optional[torch.FloatTensor] = None,
            vision_feature_layer: Optional[Union[int, list[int]]] = None,
            vision_feature_select_strategy: Optional[str] = None,
            labels: Optional[torch.LongTensor] = None,
            logits_to_keep: Union[int, torch.Tensor] = 0,
            image_sizes: Optional[torch.Tensor] = None,
            use_cache: Optional[bool] = None,
            output_text_start: Optional[int] = None,
            **kwargs,
        ) -> DynamicLlavaCausalLMOutput:
            cache = kwargs.pop("past_key_values", None) if cache is None else cache
            return self._forward(
                input_ids, pixel_values, attention_mask, position_ids, cache, inputs_embeds, vision_feature_layer,
                vision_feature_select_strategy, labels, logits_to_keep, image_sizes, use_cache, output_text_start,
                kwargs,
            )  # fmt: skip

    else:

        def forward(
            self,
            input_ids: Optional[torch.LongTensor] = None,
            pixel_values: Optional[torch.FloatTensor] = None,
            attention_mask: Optional[torch.Tensor] = None,
            position_ids: Optional[torch.LongTensor] = None,
            past_key_values: Optional[Cache] = None,
            inputs_embeds: Optional[torch.FloatTensor] = None,
            vision_feature_layer: Optional[Union[int, list[int]]] = None,
            vision_feature_select_strategy: Optional[str] = None,
            labels: Optional[torch.LongTensor] = None,
            cache_position: Optional[torch.LongTensor] = None,
            logits_to_keep: Union[int, torch.Tensor] = 0,
            image_sizes: Optional[torch.Tensor] = None,
            use_cache: Optional[bool] = None,
            output_text_start: Optional[int] = None,
            **kwargs,
        ) -> DynamicLlavaCausalLMOutput:
            return self._forward(
                input_ids, pixel_values, attention_mask, position_ids, past_key_values, inputs_embeds,
                vision_feature_layer, vision_feature_select_strategy, labels, logits_to_keep, image_sizes, use_cache,
                output_text_start, kwargs,
            )  # fmt: skip

    forward.__doc__ = """
        Same arguments as `LlavaForConditionalGeneration.forward`, plus:

        output_text_start (`int`, *optional*): without a cache, the index of the first generated token in
            `input_ids`. Tokens from there on are output text: each is scored by the output-text predictor and, when
            dropped, excluded from layers >= `sparse_layer` (the current, last token always computes).
            `generate(use_cache=False)` sets it by itself.

        Returns a `DynamicLlavaCausalLMOutput` (the Llava output plus this call's decisions). With a cache, the
        cache must be a `DynamicLlavaCache` (`generate()` builds one by itself).
        """

    def _forward(
        self, input_ids, pixel_values, attention_mask, position_ids, cache, inputs_embeds, vision_feature_layer,
        vision_feature_select_strategy, labels, logits_to_keep, image_sizes, use_cache, output_text_start, kwargs,
    ) -> DynamicLlavaCausalLMOutput:  # fmt: skip
        kwargs.pop("cache_position", None)  # positions come from position_ids / the cache's logical length
        for unsupported in ("output_attentions", "output_hidden_states"):
            if kwargs.pop(unsupported, False):
                raise ValueError(f"DynamicLlavaForConditionalGeneration does not support {unsupported}=True yet.")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if use_cache is None:
            use_cache = not self.training and getattr(self.config.text_config, "use_cache", True)
        cache = self._check_cache(cache)
        if cache is None and use_cache:
            cache = DynamicLlavaCache(self.config)
        past_length = cache.get_seq_length() if cache is not None else 0
        if cache is not None and output_text_start is not None:
            raise ValueError(
                "output_text_start is for decoding without a cache; with a cache, generated tokens are scored one "
                "by one as they are fed back. Drop output_text_start or pass use_cache=False."
            )

        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        image_token_mask = None
        if pixel_values is not None:
            image_token_mask = self._image_token_mask(input_ids, inputs_embeds)
            if output_text_start is not None:
                image_token_mask[:, output_text_start:] = False  # generated text is never an image
            if not bool(image_token_mask.any()) and past_length > 0:
                pixel_values = None  # images of an earlier turn, already in the cache (what 4.57 generate re-sends)
        if pixel_values is not None:
            features = self._image_features(
                pixel_values, vision_feature_layer, vision_feature_select_strategy, image_sizes, image_token_mask
            )
            inputs_embeds = inputs_embeds.masked_scatter(
                image_token_mask[..., None].to(inputs_embeds.device), features.to(inputs_embeds)
            )
        else:
            image_token_mask = None

        if self.training and self.config.sparsification_enabled:
            return self._training_forward(inputs_embeds, attention_mask, position_ids, image_token_mask, labels)

        hidden_states, selection, token_indices = self.sparse_decoder_forward(
            inputs_embeds, attention_mask, position_ids, cache, image_token_mask, output_text_start, use_cache
        )

        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])

        loss = None
        if labels is not None:
            if token_indices is not None:
                gathered = labels.gather(1, token_indices.clamp(min=0).to(labels.device))
                labels = gathered.masked_fill(token_indices.to(labels.device) < 0, -100)
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size)

        if cache is None and output_text_start is None:
            output_text_start = inputs_embeds.shape[1]
        elif cache is not None:
            output_text_start = None
        return DynamicLlavaCausalLMOutput(
            loss=loss,
            logits=logits,
            kept_vision_indices=selection.kept_vision_indices if selection is not None else None,
            output_text_keep=selection.output_text_keep if selection is not None else None,
            token_indices=token_indices,
            output_text_start=output_text_start,
            **{CACHE_KEY: cache},
        )

    # ---- the sparsification flow --------------------------------------------------------------------------------

    def sparse_decoder_forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        position_ids: Optional[torch.Tensor],
        cache: Optional[DynamicLlavaCache],
        image_token_mask: Optional[torch.Tensor],
        output_text_start: Optional[int],
        use_cache: bool,
    ):
        """
        Run the Llama decoder with Dynamic-LLaVA sparsification.

        Args:
            inputs_embeds: `[batch, q, H]` the chunk of this call (images already merged).
            attention_mask: `[batch, past + q]` 2D padding mask, or None.
            position_ids: `[batch, q]` original positions, or None (then `past .. past + q - 1`).
            image_token_mask: `[batch, q]` bool, True at image tokens (None: no image in this call).
        Returns:
            hidden states `[batch, q', H]` after the final norm, the `_Selection`, and `token_indices` `[batch, q']`
            (None when q' covers the whole chunk).
        """
        lm = self.model.language_model
        num_layers = len(lm.layers)
        sparse_layer = self.config.sparse_layer if self.config.sparsification_enabled else num_layers
        batch, q, _ = inputs_embeds.shape
        device = inputs_embeds.device
        past_length = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past_length, past_length + q, device=device).expand(batch, q)
        elif position_ids.shape[0] != batch:
            position_ids = position_ids.expand(batch, -1)
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("DynamicLlavaForConditionalGeneration takes a 2D attention_mask [batch, past + q].")
        token_valid = (
            attention_mask[:, -q:].to(device=device, dtype=torch.bool)
            if attention_mask is not None
            else torch.ones(batch, q, dtype=torch.bool, device=device)
        )

        if cache is not None and use_cache:
            cache.observe_tokens(token_valid)

        # 1. dense layers 0..l-1: every token, stock causal mask, stock cache layers
        hidden = inputs_embeds
        dense_mask = self._dense_mask(lm, inputs_embeds, attention_mask, position_ids, cache, past_length)
        rope = lm.rotary_emb(hidden, position_ids)
        for layer in lm.layers[:sparse_layer]:
            hidden = layer(hidden, **self._layer_kwargs(dense_mask, position_ids, rope, cache, use_cache, past_length))
        if sparse_layer == num_layers:  # sparsification off: stock compute; the cache still reports the images
            if cache is not None and use_cache and image_token_mask is not None and bool(image_token_mask.any()):
                cache.record_vision(self._split_per_row(image_token_mask, None))
            return lm.norm(hidden), None, None

        # 2. score the chunk at layer l and decide what is stored and what is computed further
        selection = self._select_tokens(hidden, token_valid, image_token_mask, cache, past_length, output_text_start)

        # 3. drop: layers >= l compute only the selected tokens (right-aligned per row)
        token_indices = None
        store, positions, valid = selection.store, position_ids, token_valid
        if not bool(selection.compute.all()):
            token_indices = _right_aligned_indices(selection.compute)
            gather = token_indices.clamp(min=0)
            hidden = hidden.gather(1, gather[..., None].expand(-1, -1, hidden.shape[-1]))
            positions = positions.gather(1, gather)
            valid = token_indices >= 0
            store = store.gather(1, gather) & valid

        # 4. sparse layers: kept past + this chunk, one explicit mask for all of them
        stored = None
        if cache is not None:
            stored = cache.stored_positions()
            if use_cache:
                cache.stage_sparse_chunk(store, positions, q)
                if selection.kept_vision_indices is not None:
                    cache.record_vision(selection.kept_vision_indices)
                if selection.output_text_keep is not None:
                    cache.record_output_text(selection.output_text_keep)
        sparse_mask = self._sparse_mask(stored, positions, valid, hidden.dtype, lm.config._attn_implementation)
        rope = lm.rotary_emb(hidden, positions)
        for layer in lm.layers[sparse_layer:]:
            hidden = layer(hidden, **self._layer_kwargs(sparse_mask, positions, rope, cache, use_cache, past_length))
        return lm.norm(hidden), selection, token_indices

    def _training_forward(self, inputs_embeds, attention_mask, position_ids, image_token_mask, labels):
        """
        Training: every token through every layer; straight-through Gumbel keep masks at `sparse_layer` (images:
        every image token; output text: the final answer span of answers >= output_text_len_for_training); the
        masked softmax in layers >= `sparse_layer`; loss = CE + mask_loss_weight * budget terms.
        """
        config = self.config
        lm = self.model.language_model
        l = config.sparse_layer
        batch, q, _ = inputs_embeds.shape
        device = inputs_embeds.device
        if position_ids is None:
            position_ids = torch.arange(q, device=device).expand(batch, q)
        valid = attention_mask.bool() if attention_mask is not None else torch.ones(batch, q, dtype=torch.bool, device=device)
        causal = torch.ones(q, q, dtype=torch.bool, device=device).tril()
        dense_mask = (causal[None] & valid[:, None, :]) | torch.eye(q, dtype=torch.bool, device=device)[None]
        dense_mask = dense_mask[:, None]
        rope = lm.rotary_emb(inputs_embeds, position_ids)
        hidden = inputs_embeds
        kwargs = {"position_ids": position_ids, "position_embeddings": rope, "use_cache": False}
        for layer in lm.layers[:l]:
            hidden = layer(hidden, attention_mask=dense_mask, **kwargs)

        keep = torch.ones(batch, q, device=device, dtype=torch.float32)
        zero = hidden.new_zeros((), dtype=torch.float32)
        vision_loss, text_loss, vision_ratio, text_ratio = zero, zero, None, None
        if config.use_vision_predictor and image_token_mask is not None and bool(image_token_mask.any()):
            image_mask = image_token_mask.to(device)
            image_hidden = hidden[image_mask].reshape(-1, self._tokens_per_image(), hidden.shape[-1])
            logits = self._run_predictor(self.image_score_predictor, image_hidden)
            image_keep = straight_through_keep(logits, self.gumbel_tau, self.gumbel_noise)  # [images, T]
            keep = keep.masked_scatter(image_mask, image_keep.reshape(-1))
            vision_ratio = image_keep.mean(dim=-1)
            vision_loss = ((config.vision_keep_rate - vision_ratio) ** 2).mean()
            vision_ratio = vision_ratio.mean()
        if config.use_output_text_predictor and labels is not None:
            start, end = answer_span(labels.to(device), valid)
            positions = torch.arange(q, device=device)[None]
            span = (positions >= start[:, None]) & (positions < end[:, None])
            length = (end - start).clamp(min=1)
            long_answer = (end - start) >= config.output_text_len_for_training
            logits = self._run_predictor(self.output_text_score_predictor, hidden)
            text_keep = straight_through_keep(logits, self.gumbel_tau, self.gumbel_noise)  # [B, q]
            active = span & long_answer[:, None]
            keep = torch.where(active, keep * text_keep, keep)
            row_ratio = (text_keep * span).sum(-1) / length
            target = torch.where(long_answer, torch.full_like(row_ratio, config.output_text_keep_rate), row_ratio.detach())
            text_loss = ((target - row_ratio) ** 2).mean()
            text_ratio = row_ratio[long_answer].mean() if bool(long_answer.any()) else None

        for layer in lm.layers[l:]:
            hidden = layer(hidden, attention_mask=None, dynamic_llava_keep=keep, **kwargs)
        logits = self.lm_head(lm.norm(hidden))
        ce = None
        if labels is not None:
            ce = self.loss_function(logits=logits, labels=labels, vocab_size=config.text_config.vocab_size)
        budget = config.mask_loss_weight * (vision_loss + text_loss)
        return DynamicLlavaCausalLMOutput(
            loss=None if ce is None else ce + budget,
            logits=logits,
            ce_loss=ce,
            vision_budget_loss=vision_loss,
            output_text_budget_loss=text_loss,
            vision_keep_ratio=vision_ratio,
            output_text_keep_ratio=text_ratio,
        )

    def _select_tokens(self, hidden, token_valid, image_token_mask, cache, past_length, output_text_start):
        """Score at `sparse_layer`: image top-k per image, output-text threshold per generated token."""
        config = self.config
        batch, q, _ = hidden.shape
        store = token_valid.clone()
        kept_vision = None
        if image_token_mask is not None and bool(image_token_mask.any()):
            image_mask = image_token_mask.to(hidden.device)
            num_tokens = self._tokens_per_image()
            image_hidden = hidden[image_mask].reshape(-1, num_tokens, hidden.shape[-1])
            if config.use_vision_predictor:
                logits = self._run_predictor(self.image_score_predictor, image_hidden)
                k = int(num_tokens * config.vision_keep_rate)
                scores = logits.float().log_softmax(dim=-1)[..., 0]
                kept = scores.topk(k, dim=-1).indices.sort(dim=-1).values  # [images, k]
                image_keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, kept, True)
                store[image_mask] = store[image_mask] & image_keep.reshape(-1)
            else:
                kept = None
            kept_vision = self._split_per_row(image_mask, kept)

        output_text_keep = None
        if config.use_output_text_predictor:
            if cache is not None and past_length > 0 and q == 1:
                scored = torch.ones(batch, 1, dtype=torch.bool, device=hidden.device)
            elif cache is None and output_text_start is not None and output_text_start < q:
                scored = torch.zeros(batch, q, dtype=torch.bool, device=hidden.device)
                scored[:, output_text_start:] = True
            else:
                scored = None
            if scored is not None:
                logits = self._run_predictor(self.output_text_score_predictor, hidden[scored].reshape(batch, -1, hidden.shape[-1]))
                output_text_keep = logits[..., 0] > logits[..., 1]  # strict, as the original
                store[scored] = store[scored] & output_text_keep.reshape(-1)

        compute = store.clone()
        compute[:, -1] = True  # the current token always computes
        return _Selection(store, compute, kept_vision, output_text_keep)

    def _split_per_row(self, image_mask: torch.Tensor, kept: Optional[torch.Tensor]) -> list:
        """`kept` `[images, k]` (None: all tokens kept) -> per row, a list with one LongTensor per image."""
        num_tokens = self._tokens_per_image()
        images_per_row = (image_mask.sum(-1) // num_tokens).tolist()
        if kept is None:
            kept = torch.arange(num_tokens, device=image_mask.device).expand(sum(images_per_row), -1)
        rows, start = [], 0
        for n in images_per_row:
            rows.append(list(kept[start : start + n].unbind(0)))
            start += n
        return rows

    @staticmethod
    def _run_predictor(predictor, hidden):
        dtype = next(predictor.parameters()).dtype
        return predictor(hidden.to(dtype))

    # ---- helpers --------------------------------------------------------------------------------------------------

    def _tokens_per_image(self) -> int:
        vision = self.config.vision_config
        n = (vision.image_size // vision.patch_size) ** 2
        return n + (1 if self.config.vision_feature_select_strategy == "full" else 0)

    def _image_token_mask(self, input_ids, inputs_embeds) -> torch.Tensor:
        token_id = self.config.image_token_id
        if input_ids is not None:
            return input_ids == token_id
        embedding = self.get_input_embeddings()(torch.tensor(token_id, device=inputs_embeds.device))
        return (inputs_embeds == embedding).all(-1)

    def _image_features(self, pixel_values, feature_layer, select_strategy, image_sizes, image_token_mask):
        """`[total image tokens, H]` projector output, checked against the `<image>` tokens of the input."""
        vision = self.config.vision_config
        expected = (vision.num_channels, vision.image_size, vision.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)}; this model expects [num_images, "
                f"{expected[0]}, {expected[1]}, {expected[2]}]. Preprocess images with the model's processor "
                "(AutoProcessor.from_pretrained(...)) and pass one image per <image> token."
            )
        per_image = self._tokens_per_image()
        n_tokens = int(image_token_mask.sum())
        if n_tokens != pixel_values.shape[0] * per_image:
            raise ValueError(
                f"The input has {n_tokens} image tokens ({n_tokens / per_image:g} images of {per_image} tokens) but "
                f"{pixel_values.shape[0]} image(s) were given in pixel_values. Put exactly one <image> in the text "
                "per image (the processor expands each to the image's tokens), or pass as many images as <image>."
            )
        rows = image_token_mask.sum(-1)
        if bool((rows % per_image != 0).any()):
            raise ValueError(
                f"A row has a number of image tokens that is not a multiple of {per_image}: {rows.tolist()}. "
                "Let the processor expand <image>; do not cut prompts inside an image."
            )
        kwargs = {"image_sizes": image_sizes} if image_sizes is not None else {}
        tower = self.model.vision_tower
        tower_dtype = tower.dtype if tower.dtype.is_floating_point else pixel_values.dtype  # (quantized towers)
        out = self.model.get_image_features(
            pixel_values=pixel_values.to(tower_dtype),
            vision_feature_layer=feature_layer if feature_layer is not None else self.config.vision_feature_layer,
            vision_feature_select_strategy=select_strategy
            if select_strategy is not None
            else self.config.vision_feature_select_strategy,
            **kwargs,
        )
        features = out.pooler_output if hasattr(out, "pooler_output") else out
        return torch.cat(list(features), dim=0)

    def _check_cache(self, cache):
        if cache is None or hasattr(cache, "stage_sparse_chunk"):
            if cache is not None and len(cache.layers) != self.config.text_config.num_hidden_layers:
                raise ValueError("This DynamicLlavaCache was built for another model (layer count differs).")
            return cache
        if isinstance(cache, DynamicCache) and cache.get_seq_length() == 0:
            return DynamicLlavaCache(self.config)  # an empty plain cache: swap in ours
        raise TypeError(
            f"DynamicLlavaForConditionalGeneration needs a DynamicLlavaCache, got {type(cache).__name__}. Pass none "
            "(generate() and forward() build one), or DynamicLlavaCache(model.config), or the `past_key_values`/"
            "`cache` returned by an earlier call of this model."
        )

    def _dense_mask(self, lm, inputs_embeds, attention_mask, position_ids, cache, past_length):
        kwargs = {"config": lm.config, _MASK_EMBEDS_KEY: inputs_embeds, "attention_mask": attention_mask,
                  CACHE_KEY: cache, "position_ids": position_ids}  # fmt: skip
        if NEEDS_CACHE_POSITION:
            q = inputs_embeds.shape[1]
            kwargs["cache_position"] = torch.arange(past_length, past_length + q, device=inputs_embeds.device)
        return create_causal_mask(**kwargs)

    @staticmethod
    def _layer_kwargs(mask, position_ids, rope, cache, use_cache, past_length):
        kwargs = {
            "attention_mask": mask,
            "position_ids": position_ids,
            "position_embeddings": rope,
            CACHE_KEY: cache if use_cache else None,
            "use_cache": use_cache,
        }
        if NEEDS_CACHE_POSITION:
            q = position_ids.shape[-1]
            kwargs["cache_position"] = torch.arange(past_length, past_length + q, device=position_ids.device)
        return kwargs

    @staticmethod
    def _sparse_mask(stored_positions, positions, valid, dtype, attn_implementation):
        """
        Mask of the sparse layers, `[batch, 1, q', stored + q']`: the key order of `SparseLayer.update()`.

        A query at position p sees a key iff the key is a real token (not padding, not an empty slot) and its
        position is <= p; every query sees itself, so filler rows of a ragged chunk stay finite.
        """
        key_positions = torch.where(valid, positions, torch.full_like(positions, -1))
        if stored_positions is not None:
            key_positions = torch.cat([stored_positions.to(positions.device), key_positions], dim=-1)
        visible = (key_positions[:, None, :] >= 0) & (key_positions[:, None, :] <= positions[:, :, None])
        q = positions.shape[-1]
        offset = key_positions.shape[-1] - q
        diagonal = torch.arange(q, device=positions.device)
        visible[:, diagonal, offset + diagonal] = True
        visible = visible[:, None]
        if attn_implementation == "sdpa":
            return visible
        if attn_implementation == "eager":
            return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(
                ~visible, torch.finfo(dtype).min
            )
        raise ValueError(
            f"attn_implementation={attn_implementation!r} is not supported by Dynamic-LLaVA's sparse layers yet; "
            "load the model with attn_implementation='sdpa' (default) or 'eager'."
        )

    # ---- generate() integration ---------------------------------------------------------------------------------

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """Build a `DynamicLlavaCache` when the caller passes none; refuse (or swap an empty) plain cache."""
        given = model_kwargs.get(CACHE_KEY)
        if given is None and CACHE_KEY != "past_key_values":
            given = model_kwargs.get("past_key_values")
        if given is not None:
            model_kwargs[CACHE_KEY] = self._check_cache(given)
            if CACHE_KEY != "past_key_values":
                model_kwargs.pop("past_key_values", None)
            return
        if generation_config.use_cache is False:
            return
        model_kwargs[CACHE_KEY] = DynamicLlavaCache(self.config)

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs):
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        if getattr(outputs, "output_text_start", None) is not None:
            model_kwargs["output_text_start"] = outputs.output_text_start  # no cache: the prompt ends here
        return model_kwargs


def _right_aligned_indices(compute: torch.Tensor) -> torch.Tensor:
    """
    `compute` `[batch, q]` bool -> `[batch, q']` long indices of the True entries, right-aligned per row (so the last
    position is each row's current token), -1 in the filler slots on the left; q' = max True count.
    """
    counts = compute.sum(-1)
    width = int(counts.max())
    dest = compute.long().cumsum(-1) - 1 + (width - counts)[:, None]
    dest = torch.where(compute, dest, torch.full_like(dest, width))
    out = torch.full((compute.shape[0], width + 1), -1, dtype=torch.long, device=compute.device)
    source = torch.arange(compute.shape[1], device=compute.device).expand_as(dest)
    out.scatter_(1, dest, source)
    return out[:, :width]
