"""The Dynamic-LLaVA flow of one forward through the language model, the same for every base model.

`sparse_decoder_forward(model, call, inputs_embeds)` runs it in numbered steps:

1. dense layers `0..l-1` (`l` = `sparse_layer`): every token, the stock causal mask (a static cache: the
   position-tag rule);
2. score the chunk at layer `l`: which image tokens each image keeps (the learned image predictor, or the
   training-free attention rule, `sparse_scorers.py`), and whether each generated token enters the cache (the
   output-text predictor); in training, straight-through Gumbel masks and the budget terms instead;
3. drop: layers `>= l` compute only the selected tokens (right-aligned per row);
4. sparse layers: the kept past plus this chunk, one explicit mask for all of them, built from position tags, after
   the one hand-over to the cache (`cache.admit(SparseChunk)`).

The flow knows nothing of the base: `model` gives it `language_model` (its decoder `layers`, `norm` and
`rotary_emb`), the two predictors, and `gather_rope_positions` (how the base's RoPE positions follow a drop: 1-D
positions for Llama-style bases, M-RoPE's `[3, batch, q]` for Qwen2.5-VL). Where the images are and what each
token's positions are comes in the `SparseCall`, built once at the top of the forward by the base's adapter.

This file is a Hub remote-code module (flat imports only; nothing runs at import).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .sparse_cache import SparseChunk
from .sparse_masks import attention_mask_for, tags, visible_keys
from .sparse_predictors import run_predictor
from .sparse_scorers import attention_received, image_keep_scores
from .sparse_settings import SparsitySettings
from .sparse_training import answer_span, budget_loss, row_weights, straight_through_keep
from .transformers_compat import CACHE_KEY, decoder_layer_kwargs, dense_causal_mask, layer_output

__all__ = [
    "DynamicLlavaCausalLMOutput",
    "DynamicLlavaModelOutput",
    "ImageLayout",
    "SparseCall",
    "sparse_decoder_forward",
]

# `output_text_start` before the prompt has been consumed: no column of the call is generated text
PROMPT_ONLY = sys.maxsize


# ---------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class DynamicLlavaModelOutput(BaseModelOutputWithPast):
    """
    The language model's output (`last_hidden_state` after the final norm) plus what this call decided.

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
class DynamicLlavaCausalLMOutput(CausalLMOutputWithPast):
    """
    `CausalLMOutputWithPast` plus what this call decided (see `DynamicLlavaModelOutput`), and in training the loss
    terms (`loss` = `ce_loss` + `mask_loss_weight` x (`vision_budget_loss` + `output_text_budget_loss`)).
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


# ---------------------------------------------------------------------------------------------------------------
# The inputs of one call
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageLayout:
    """
    Where this call's images are.

    mask: `[batch, q]` bool, True at image tokens.
    per_row: images per row (host ints; images are numbered row by row, in order).
    sizes: tokens of each image (host ints, in that order); an image's tokens are its run of image tokens.
    """

    mask: torch.Tensor
    per_row: list[int]
    sizes: list[int]

    @property
    def total_tokens(self) -> int:
        return sum(self.sizes)

    @property
    def starts(self) -> list[int]:
        """Offset of each image's first token among all image tokens of the call."""
        offsets, start = [], 0
        for size in self.sizes:
            offsets.append(start)
            start += size
        return offsets

    def flat_positions(self) -> torch.Tensor:
        """Flat indices (`[total_tokens]`) of the image tokens in `[batch * q]`, in order, without a host sync."""
        return torch.nonzero_static(self.mask.reshape(-1), size=self.total_tokens).squeeze(-1)

    def groups(self) -> list[tuple[list[int], int]]:
        """The images grouped by size (each group scored in one batch): `[(image indices, size), ...]`."""
        by_size: dict[int, list[int]] = {}
        for index, size in enumerate(self.sizes):
            by_size.setdefault(size, []).append(index)
        return [(indices, size) for size, indices in by_size.items()]

    def token_index(self, indices: list[int], size: int, device: torch.device) -> torch.Tensor:
        """`[len(indices), size]` long: each image's tokens among all image tokens of the call."""
        starts = torch.tensor([self.starts[i] for i in indices], dtype=torch.long, device=device)
        return starts[:, None] + torch.arange(size, device=device)

    def per_row_lists(self, kept: list[torch.Tensor] | None) -> list[list[torch.Tensor]]:
        """`kept`: one LongTensor per image (None: every token kept) -> per row, a list with one per image."""
        if kept is None:
            kept = [torch.arange(size, device=self.mask.device) for size in self.sizes]
        rows, start = [], 0
        for n in self.per_row:
            rows.append(list(kept[start : start + n]))
            start += n
        return rows


def kept_vision_of(images: ImageLayout | None, kept: list[torch.Tensor] | None, batch: int) -> list:
    """Per row, one LongTensor of kept indices per image (an empty list for a row without image)."""
    return [[] for _ in range(batch)] if images is None else images.per_row_lists(kept)


@dataclass(frozen=True)
class SparseCall:
    """
    Everything one forward of the flow reads, built once at its top by the base's adapter.

    batch, q: rows and tokens of this call. settings: its sparsity (`SparsitySettings`). sparse_layer: the first
    sparse layer (the cache's, or every layer dense when sparsity is off).
    cache: the cache, or None; static: a preallocated cache (no host reads of its length); past_length: the tokens
        already in a growing cache (0 for a static one, whose length lives on the device).
    positions: `[batch, q]` long, each token's position (its position tag, and the order of the causal mask).
    rope_positions: the positions the base's rotary embedding takes (`positions` itself for Llama-style bases,
        `[3, batch, q]` for M-RoPE); its last dimension is the token.
    columns: `[batch, q]` long, each token's column in the whole sequence (what `attention_mask` indexes).
    token_valid: `[batch, q]` bool, the real tokens (not padding). attention_mask: the 2D mask over the whole
        sequence, or None.
    generated_from: index in this chunk from which tokens are generated text (scored by the output-text
        predictor), or None (all prompt). output_text_start: as given (for the next call).
    images: where this call's image tokens are, or None. training: the training flow (no token removed);
        labels: training only.
    """

    batch: int
    q: int
    settings: SparsitySettings
    sparse_layer: int
    cache: Any
    static: bool
    past_length: int
    positions: torch.Tensor
    rope_positions: torch.Tensor
    columns: torch.Tensor
    token_valid: torch.Tensor
    attention_mask: torch.Tensor | None
    generated_from: int | None
    output_text_start: int | None
    images: ImageLayout | None
    training: bool
    labels: torch.Tensor | None = None
    loss_tokens: Any = None

    @property
    def is_prompt(self) -> bool:
        return self.generated_from is None


# ---------------------------------------------------------------------------------------------------------------
# The steps
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Selection:
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


@dataclass(frozen=True)
class Computed:
    """What the sparse layers compute after step 3: `c` tokens per row (`c = q` when nothing was dropped)."""

    hidden: torch.Tensor  # [batch, c, H]
    positions: torch.Tensor  # [batch, c] long
    rope_positions: torch.Tensor  # the base's shape, last dimension c
    columns: torch.Tensor  # [batch, c] long
    valid: torch.Tensor  # [batch, c] bool: real tokens (not filler, not padding)
    store: torch.Tensor  # [batch, c] bool: enter the cache
    token_indices: torch.Tensor | None  # [batch, c] index into the chunk (-1 = filler), None: the whole chunk
    plainly_causal: bool  # keys == queries in order: sdpa may run causal without a mask
    rope: Any = None  # the rotary (cos, sin) of these tokens when step 1's still apply (nothing dropped), else None


@dataclass(frozen=True)
class DenseResult:
    """Step 1: the hidden states entering layer `sparse_layer`, and the attention the image tokens received in the
    layer before it (`[batch, q]`, only for the attention scorer)."""

    hidden: torch.Tensor
    received: torch.Tensor | None = None
    rope: Any = None  # the rotary (cos, sin) of the chunk (the sparse layers reuse it when no token is dropped)


def sparse_decoder_forward(model: Any, call: SparseCall, inputs_embeds: torch.Tensor) -> DynamicLlavaModelOutput:
    """
    Run the base's decoder with Dynamic-LLaVA sparsification (inference and training share it).

    Args:
        model: the base model without head (`language_model`, the predictors, `gather_rope_positions`).
        call: this forward's inputs (see `SparseCall`).
        inputs_embeds: `[batch, q, H]` the chunk of this call (images already merged).
    Returns:
        `DynamicLlavaModelOutput`: hidden states `[batch, q', H]` after the final norm (q' < q when tokens were
        dropped: `token_indices` maps them back), the cache, and this call's decisions.
    """
    lm = model.language_model
    # 1. dense layers 0..l-1: every token
    dense = run_dense_layers(model, call, inputs_embeds)
    if call.sparse_layer == len(lm.layers):  # an all-dense cache (sparsification off): stock compute
        return dense_only_output(model, call, dense.hidden)
    # 2. score the chunk at layer l: what is stored and what runs through the sparse layers
    if call.training:
        selection = select_for_training(model, call, dense.hidden)
    else:
        selection = select_for_inference(model, call, dense.hidden, dense.received)
    # 3. drop: layers >= l compute only the selected tokens (right-aligned per row)
    computed = drop(model, call, dense, selection)
    # 4. sparse layers: the kept past plus this chunk, one explicit mask for all of them (one hand-over)
    hidden = run_sparse_layers(model, call, computed, selection)
    return DynamicLlavaModelOutput(
        last_hidden_state=lm.norm(hidden),
        kept_vision_indices=selection.kept_vision_indices,
        output_text_keep=selection.output_text_keep,
        token_indices=computed.token_indices,
        output_text_start=next_output_text_start(call),
        vision_keep_ratio=selection.vision_keep_ratio,
        output_text_keep_ratio=selection.output_text_keep_ratio,
        vision_budget_loss=selection.vision_budget_loss,
        output_text_budget_loss=selection.output_text_budget_loss,
        **{CACHE_KEY: call.cache},
    )


def run_dense_layers(model: Any, call: SparseCall, inputs_embeds: torch.Tensor) -> DenseResult:
    """Step 1. The stock causal mask (a static cache: the position-tag rule over its dense columns); with the
    attention scorer, the attention the image tokens receive in layer `sparse_layer - 1`."""
    lm = model.language_model
    hidden = inputs_embeds
    dense_keys = None
    if call.static:
        dense_keys = call.cache.begin_dense(call.positions, call.token_valid, call.attention_mask)
        visible = visible_keys(dense_keys, call.positions, call.token_valid)
        mask = attention_mask_for(visible, lm.config._attn_implementation, hidden.dtype)
    else:
        mask = dense_causal_mask(
            lm.config, inputs_embeds, call.attention_mask, call.cache, call.positions, call.past_length
        )
    rope = lm.rotary_emb(hidden, call.rope_positions)
    kwargs = decoder_layer_kwargs(mask, call.positions, rope, call.cache, call.cache is not None, None)
    wants_scores = (
        not call.training
        and call.images is not None
        and call.settings.use_vision_predictor
        and call.settings.image_scorer == "attention"
    )
    received = None
    for index, layer in enumerate(lm.layers[: call.sparse_layer]):
        if wants_scores and index == call.sparse_layer - 1:
            entering = hidden
            hidden = layer_output(layer(hidden, **kwargs))
            received = attention_received(layer, entering, rope, call, dense_keys)
        else:
            hidden = layer_output(layer(hidden, **kwargs))
    return DenseResult(hidden=hidden, received=received, rope=rope)


def dense_only_output(model: Any, call: SparseCall, hidden: torch.Tensor) -> DynamicLlavaModelOutput:
    """An all-dense call (sparsification off): the stock compute, and the cache's bookkeeping."""
    kept = kept_vision_of(call.images, None, call.batch)
    if call.cache is not None:
        call.cache.admit(
            SparseChunk(
                token_valid=call.token_valid,
                positions=call.positions,
                valid=call.token_valid,
                store=call.token_valid,
                num_new_tokens=call.q,
                kept_vision_indices=kept,
                is_prompt=call.is_prompt,
                columns=call.columns,
                attention_mask=call.attention_mask,
            )
        )
    return DynamicLlavaModelOutput(
        last_hidden_state=model.language_model.norm(hidden),
        kept_vision_indices=kept,
        output_text_start=next_output_text_start(call),
        **{CACHE_KEY: call.cache},
    )


def select_images(
    model: Any, call: SparseCall, hidden: torch.Tensor, received: torch.Tensor | None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """
    Per image, the top `image_keep_count` tokens by score (kept in their original order).

    Returns:
        `[total_tokens]` bool keep flags of the call's image tokens (in order), and per image its kept indices.
    """
    images = call.images
    flat = images.flat_positions().to(hidden.device)  # [total_tokens]
    image_hidden = hidden.reshape(-1, hidden.shape[-1])[flat]  # [total_tokens, H]
    image_received = None if received is None else received.reshape(-1)[flat]
    keep = torch.zeros(images.total_tokens, dtype=torch.bool, device=hidden.device)
    kept: list[torch.Tensor | None] = [None] * len(images.sizes)
    for indices, size in images.groups():
        index = images.token_index(indices, size, hidden.device)  # [n, size]
        scores = image_keep_scores(model, call.settings, image_hidden, image_received, index)
        top = scores.topk(call.settings.image_keep_count(size), dim=-1).indices.sort(dim=-1).values  # [n, k]
        keep[index.gather(1, top).reshape(-1)] = True
        for row, image in enumerate(indices):
            kept[image] = top[row]
    return keep, kept


def select_for_inference(
    model: Any, call: SparseCall, hidden: torch.Tensor, received: torch.Tensor | None
) -> Selection:
    """Step 2 at inference: image top-k per image, output-text threshold per generated token."""
    batch, q = call.batch, call.q
    settings = call.settings
    store = call.token_valid
    kept = None
    if call.images is not None and settings.use_vision_predictor:
        image_keep, kept = select_images(model, call, hidden, received)
        flat = store.reshape(-1).clone()
        flat[call.images.flat_positions().to(hidden.device)] &= image_keep
        store = flat.reshape(batch, q)
    kept_vision = kept_vision_of(call.images, kept, batch)

    output_text_keep = scored = None
    start = call.generated_from
    if settings.use_output_text_predictor and start is not None:
        scored = call.token_valid if start == 0 else call.token_valid[:, start:]
        # keep iff logit 0 > logit 1 (strict, as the original); a decode step runs the predictor on `[batch, H]`
        if q == 1:
            logits = run_predictor(model.output_text_score_predictor, hidden[:, 0])
            output_text_keep = logits[:, :1] > logits[:, 1:]
            store = output_text_keep  # (the cache keeps it only for a real token of a live row)
        else:
            logits = run_predictor(model.output_text_score_predictor, hidden[:, start:])
            output_text_keep = logits[..., 0] > logits[..., 1]
            if start == 0:
                store = store & output_text_keep
            else:
                store = torch.cat([store[:, :start], store[:, start:] & output_text_keep], dim=-1)

    if q == 1:
        return Selection(store, store, kept_vision, output_text_keep, scored)  # (the token always computes)
    compute = store.clone()
    compute[:, -1] = True  # the current token always computes
    return Selection(store, compute, kept_vision, output_text_keep, scored)


def select_for_training(model: Any, call: SparseCall, hidden: torch.Tensor) -> Selection:
    """
    Step 2 in training (no token removed): straight-through Gumbel keep masks for every image token and for the
    final answer span of answers >= `output_text_len_for_training`, and the budget terms.
    """
    config = model.config
    settings = call.settings
    batch, q = call.batch, call.q
    keep = call.token_valid.float()  # padding columns are never kept
    zero = hidden.new_zeros((), dtype=torch.float32)
    weights, total = row_weights(call.labels, batch, call.loss_tokens, hidden.device)
    selection = Selection(
        store=call.token_valid,
        compute=torch.ones_like(call.token_valid),
        kept_vision_indices=[[] for _ in range(batch)],
        vision_budget_loss=zero,
        output_text_budget_loss=zero,
    )
    if settings.use_vision_predictor and call.images is not None:
        images = call.images
        flat = images.flat_positions().to(hidden.device)
        image_hidden = hidden.reshape(-1, hidden.shape[-1])[flat]
        image_keep = torch.zeros(images.total_tokens, dtype=torch.float32, device=hidden.device)
        ratios = torch.zeros(len(images.sizes), dtype=torch.float32, device=hidden.device)
        for indices, size in images.groups():
            index = images.token_index(indices, size, hidden.device)
            logits = run_predictor(model.image_score_predictor, image_hidden[index])
            group_keep = straight_through_keep(logits, model.gumbel_tau, model.gumbel_noise)  # [n, size]
            image_keep = image_keep.index_put((index.reshape(-1),), group_keep.reshape(-1))
            ratios = ratios.index_put((torch.tensor(indices, device=hidden.device),), group_keep.mean(dim=-1))
        keep = keep.reshape(-1).index_put((flat,), image_keep).reshape(batch, q)
        images_per_row = torch.tensor(images.per_row, device=hidden.device)
        row_of = torch.repeat_interleave(torch.arange(batch, device=hidden.device), images_per_row)  # [images]
        terms = (settings.vision_keep_rate - ratios) ** 2 / images_per_row[row_of]  # a row's term: mean over its images
        row_terms = torch.zeros(batch, dtype=torch.float32, device=hidden.device).index_add(0, row_of, terms)
        selection.vision_budget_loss = budget_loss(row_terms, weights, total)
        selection.vision_keep_ratio = ratios.mean()
    if settings.use_output_text_predictor and call.labels is not None:
        start, end = answer_span(call.labels.to(hidden.device), call.token_valid)
        columns = torch.arange(q, device=hidden.device)[None]
        span = (columns >= start[:, None]) & (columns < end[:, None])
        length = (end - start).clamp(min=1)
        long_answer = (end - start) >= config.output_text_len_for_training
        logits = run_predictor(model.output_text_score_predictor, hidden)
        text_keep = straight_through_keep(logits, model.gumbel_tau, model.gumbel_noise)  # [B, q]
        keep = torch.where(span & long_answer[:, None], keep * text_keep, keep)
        row_ratio = (text_keep * span).sum(-1) / length
        target = torch.where(long_answer, torch.full_like(row_ratio, config.output_text_keep_rate), row_ratio)
        selection.output_text_budget_loss = budget_loss((target.detach() - row_ratio) ** 2, weights, total)
        selection.output_text_keep_ratio = row_ratio[long_answer].mean() if bool(long_answer.any()) else None
    selection.keep = keep
    return selection


def drop(model: Any, call: SparseCall, dense: DenseResult, selection: Selection) -> Computed:
    """Step 3. Rows keep their computed tokens right-aligned (the last position is each row's current token); one
    host sync for the width (none for a decode step or in training, where every row computes all its tokens)."""
    hidden = dense.hidden
    width = shortest = call.q
    no_padding = False
    if call.q > 1 and not call.training:
        counts = selection.compute.sum(-1)
        width, shortest, no_padding = torch.stack([counts.max(), counts.min(), call.token_valid.all().long()]).tolist()
    plainly_causal = (
        not call.training
        and call.q > 1
        and model.language_model.config._attn_implementation == "sdpa"
        and (call.cache is None or (call.cache.is_empty and not call.static))
        and bool(no_padding)
        and shortest == width
    )
    if shortest == call.q:  # every row computes every token
        return Computed(
            hidden=hidden,
            positions=call.positions,
            rope_positions=call.rope_positions,
            columns=call.columns,
            valid=call.token_valid,
            store=selection.store,
            token_indices=None,
            plainly_causal=plainly_causal,
            rope=dense.rope,
        )
    token_indices = right_aligned_indices(selection.compute, width)
    gather = token_indices.clamp(min=0)
    valid = (token_indices >= 0) & call.token_valid.gather(1, gather)
    return Computed(
        hidden=hidden.gather(1, gather[..., None].expand(-1, -1, hidden.shape[-1])),
        positions=call.positions.gather(1, gather),
        rope_positions=model.gather_rope_positions(call.rope_positions, gather),
        columns=call.columns.gather(1, gather),
        valid=valid,
        store=selection.store.gather(1, gather) & valid,
        token_indices=token_indices,
        plainly_causal=plainly_causal,
    )


def run_sparse_layers(model: Any, call: SparseCall, computed: Computed, selection: Selection) -> torch.Tensor:
    """Step 4. The one hand-over to the cache, then one mask (the position-tag rule) for every sparse layer."""
    lm = model.language_model
    if call.cache is not None:
        chunk = SparseChunk(
            token_valid=call.token_valid,
            positions=computed.positions,
            valid=computed.valid,
            store=computed.store,
            num_new_tokens=call.q,
            kept_vision_indices=selection.kept_vision_indices,
            output_text_keep=selection.output_text_keep,
            output_text_scored=selection.output_text_scored,
            is_prompt=call.is_prompt,
            columns=computed.columns,
            attention_mask=call.attention_mask,
        )
        key_positions = call.cache.admit(chunk, plainly_causal=computed.plainly_causal)
    else:
        key_positions = tags(computed.positions, computed.valid)
    if computed.plainly_causal:
        mask = None  # keys == queries in order: sdpa runs causal, with its flash / efficient kernels
    elif call.training:
        mask = visible_keys(key_positions, computed.positions, computed.valid)  # bool, for the masked softmax
    else:
        visible = visible_keys(key_positions, computed.positions, None if call.q == 1 else computed.valid)
        mask = attention_mask_for(visible, lm.config._attn_implementation, computed.hidden.dtype)
    hidden = computed.hidden
    rope = computed.rope if computed.rope is not None else lm.rotary_emb(hidden, computed.rope_positions)
    kwargs = decoder_layer_kwargs(mask, computed.positions, rope, call.cache, call.cache is not None, None)
    if call.training:
        kwargs["dynamic_llava_keep"] = selection.keep
    for layer in lm.layers[call.sparse_layer :]:
        hidden = layer_output(layer(hidden, **kwargs))
    return hidden


def next_output_text_start(call: SparseCall) -> int | None:
    """The column where generated text starts, for the next call: generate() passes PROMPT_ONLY until the
    prompt has gone through; a manual call without a cache gets its own length (what to pass back)."""
    if call.output_text_start is None:
        return call.q if call.cache is None else None
    if call.output_text_start != PROMPT_ONLY:
        return call.output_text_start
    if call.static:
        return call.cache.get_seq_length()  # (after the prompt: eager, one host read)
    return call.past_length + call.q


def right_aligned_indices(compute: torch.Tensor, width: int) -> torch.Tensor:
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
