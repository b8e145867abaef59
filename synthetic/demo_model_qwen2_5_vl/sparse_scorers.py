"""What ranks an image's tokens at prefill (`image_scorer`): the learned image predictor, or a training-free rule.

* "predictor" (the method): the image predictor's keep log-probability of each token entering `sparse_layer`.
* "attention": FastV's rule (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024): the mean
  attention each image token receives in the layer before `sparse_layer` (layer `sparse_layer - 1`), averaged over
  that layer's heads and over the real tokens of the chunk (a token before the image gives it none, by causality).
  A baseline and a no-training start for a base without trained predictors, not the method.

Either way the top `vision_keep_tokens` (or `int(tokens * vision_keep_rate)`) of each image are kept, with the same
budgets, caches and reports.

This file is a Hub remote-code module (flat imports only; nothing runs at import).
"""

from __future__ import annotations

from typing import Any

import torch

from .sparse_masks import visible_keys
from .sparse_predictors import run_predictor
from .sparse_settings import SparsitySettings
from .transformers_compat import rotate_queries

__all__ = ["attention_received", "image_keep_scores"]


def image_keep_scores(
    model: Any,
    settings: SparsitySettings,
    image_hidden: torch.Tensor,
    image_received: torch.Tensor | None,
    index: torch.Tensor,
) -> torch.Tensor:
    """
    Args:
        image_hidden: `[tokens, H]` every image token of the call, as it enters `sparse_layer`.
        image_received: `[tokens]` the attention each received in the layer before (the attention scorer), or None.
        index: `[images, size]` the tokens of a group of images of the same size.
    Returns:
        `[images, size]` scores, higher = keep.
    """
    if settings.image_scorer == "attention":
        return image_received[index]
    logits = run_predictor(model.image_score_predictor, image_hidden[index])
    return logits.float().log_softmax(dim=-1)[..., 0]


def attention_received(
    layer: torch.nn.Module,
    entering: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    call: Any,
    dense_keys: torch.Tensor | None,
) -> torch.Tensor:
    """
    The attention each token of this chunk receives in `layer` (a stock decoder layer that has just run).

    Args:
        layer: the decoder layer `sparse_layer - 1`.
        entering: `[batch, q, H]` the hidden states that entered it.
        rope: its rotary (cos, sin).
        call: the `SparseCall` (cache, positions, columns, masks).
        dense_keys: `[batch, max_cache_len]` position tags of a static cache's dense columns, else None.
    Returns:
        `[batch, q]` float32: per token, its attention probability summed over the real queries of the chunk and
        averaged over heads and those queries.
    """
    attention = layer.self_attn
    batch, q, _ = entering.shape
    head_dim = attention.head_dim
    normed = layer.input_layernorm(entering)
    queries = attention.q_proj(normed).view(batch, q, -1, head_dim).transpose(1, 2)  # [B, heads, q, D]
    cache = call.cache
    if cache is not None:
        keys = cache.layers[attention.layer_idx].keys  # [B, kv_heads, K, D] after this chunk was written
        queries = rotate_queries(attention, queries, rope)
    else:
        keys = attention.k_proj(normed).view(batch, q, -1, head_dim).transpose(1, 2)
        queries, keys = rotate_queries(attention, queries, rope, keys)
    width = keys.shape[-2]
    if call.static:
        visible = visible_keys(dense_keys, call.positions, call.token_valid)[:, 0]  # [B, q, K]
    else:
        past = width - q
        key_columns = torch.arange(width, device=entering.device)
        query_columns = past + torch.arange(q, device=entering.device)
        visible = (key_columns[None, :] <= query_columns[:, None]).expand(batch, -1, -1)
        if call.attention_mask is not None:
            visible = visible & call.attention_mask[:, -width:].bool().to(entering.device)[:, None, :]
        elif cache is None:
            visible = visible & call.token_valid[:, None, :]
    scaling = getattr(attention, "scaling", head_dim**-0.5)
    real = call.token_valid.to(torch.float32)  # [B, q]: the queries that count
    kv_heads = keys.shape[1]
    groups = queries.shape[1] // kv_heads
    received = torch.zeros(batch, width, dtype=torch.float32, device=entering.device)
    for head in range(kv_heads):  # (one kv head at a time: [B, groups, q, K] at most)
        scores = queries[:, head * groups : (head + 1) * groups].float() @ keys[:, head, None].float().transpose(-1, -2)
        scores = (scores * scaling).masked_fill(~visible[:, None], float("-inf"))
        probabilities = torch.nan_to_num(scores.softmax(dim=-1), nan=0.0)  # (a padding query sees nothing)
        received += (probabilities * real[:, None, :, None]).sum(dim=(1, 2))
    received = received / (queries.shape[1] * real.sum(-1, keepdim=True).clamp(min=1.0))
    if call.static:
        return received.gather(1, call.columns)
    return received[:, -q:]
