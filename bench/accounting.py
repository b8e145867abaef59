"""FLOP and KV-byte accounting of the bench.

* FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` with the decoder's attention as plain matmuls
  (eager): 4 * heads * queries * keys * head_dim per layer, whatever the mask. SDPA calls that stay (the predictor's
  attention) are counted by the same formula: the counter knows the GPU kernels, `flop_counter_mode()` adds the CPU
  one.
* KV bytes are read from the caches themselves (ours: `stored_bytes()`; stock: the `DynamicCache` tensors).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from .. import sparse_flow
from ..transformers_compat import CACHE_KEY
from .bases import bench_base

__all__ = ["cache_bytes", "eager_attention", "entry_bytes", "flop_counter_mode", "layer_flops", "per_layer_flops"]


def flop_counter_mode() -> FlopCounterMode:
    """A `FlopCounterMode` that also counts SDPA's CPU kernel (the counter registers only the GPU ones), with
    torch's own SDPA formula (4 * batch * heads * queries * keys * head_dim, the eager matmuls' count)."""
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    mapping = {} if cpu_sdpa is None else {cpu_sdpa: _sdpa_flops}
    return FlopCounterMode(display=False, custom_mapping=mapping)


def _sdpa_flops(
    query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, out_shape: Any = None, **kw: Any
) -> int:
    """SDPA's FLOPs from its shapes (the counter passes shapes; torch's `sdpa_flop_count`)."""
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def cache_bytes(cache: Any) -> int:
    """Bytes of key/value tensors a cache holds (ours or a stock DynamicCache)."""
    if hasattr(cache, "stored_bytes"):
        return cache.stored_bytes()
    total = 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            if t is not None:
                total += t.numel() * t.element_size()
    return total


def entry_bytes(cache: Any) -> int:
    """Bytes of the entries a cache keeps, row by row: ours' kept count of each row in each layer (without the
    padding of shorter rows to the longest kept row that its rectangular storage holds); a stock cache's storage."""
    if not hasattr(cache, "kept_lengths"):
        return cache_bytes(cache)
    lengths = cache.kept_lengths()  # [layers, batch]
    return sum(int(lengths[i].sum()) * layer.bytes_per_token() for i, layer in enumerate(cache.layers))


@contextlib.contextmanager
def eager_attention(model: torch.nn.Module) -> Iterator[None]:
    """The decoder's attention as plain matmuls while counting (`flop_counter_mode` counts SDPA's CPU kernel too, with
    the same formula; the decoder's count goes through the matmuls as it always has)."""
    configs = [model.config, model.config.text_config, model.config.vision_config]
    saved = [c._attn_implementation for c in configs]
    for c in configs:
        c._attn_implementation = "eager"
    try:
        yield
    finally:
        for c, impl in zip(configs, saved, strict=True):
            c._attn_implementation = impl


@contextlib.contextmanager
def per_layer_flops(model: torch.nn.Module) -> Iterator[dict[str, Any]]:
    """
    Count FLOPs of a forward, split per decoder layer / predictor / scorer / rest (attention counted as eager
    matmuls: 4 * heads * T * K * head_dim per layer, whatever the mask). "scorers": what the training-free attention
    scorer spends recomputing the attention of layer `sparse_layer - 1` (`sparse_scorers.attention_received`; 0
    with the predictor). "llm" = layers + predictors + scorers. Yields a dict filled on exit.
    """
    lm = model.model.language_model
    result = {"layers": [0] * len(lm.layers), "predictors": 0, "scorers": 0, "total": 0}
    counter = flop_counter_mode()
    marks = {}
    handles = []

    def pre(key):
        def hook(module, args, kwargs=None):
            marks[key] = counter.get_total_flops()

        return hook

    def post(key, slot):
        def hook(module, args, output):
            spent = counter.get_total_flops() - marks.pop(key)
            if slot == "predictors":
                result["predictors"] += spent
            else:
                result["layers"][slot] += spent

        return hook

    for i, layer in enumerate(lm.layers):
        handles.append(layer.register_forward_pre_hook(pre(("layer", i))))
        handles.append(layer.register_forward_hook(post(("layer", i), i)))
    for name in ("image_score_predictor", "output_text_score_predictor"):
        module = getattr(model, name, None)
        if module is not None:
            handles.append(module.register_forward_pre_hook(pre(name)))
            handles.append(module.register_forward_hook(post(name, "predictors")))
    try:
        with counter, eager_attention(model), counted_scorer(counter, result):
            yield result
    finally:
        for handle in handles:
            handle.remove()
        result["total"] = counter.get_total_flops()
        result["llm"] = sum(result["layers"]) + result["predictors"] + result["scorers"]


@contextlib.contextmanager
def counted_scorer(counter: FlopCounterMode, result: dict[str, Any]) -> Iterator[None]:
    """Add the FLOPs of each `sparse_flow.attention_received` call (the attention scorer) to `result["scorers"]`."""
    scorer = sparse_flow.attention_received

    def counted(*args: Any, **kwargs: Any) -> Any:
        before = counter.get_total_flops()
        try:
            return scorer(*args, **kwargs)
        finally:
            result["scorers"] += counter.get_total_flops() - before

    sparse_flow.attention_received = counted
    try:
        yield
    finally:
        sparse_flow.attention_received = scorer


def layer_flops(stock: torch.nn.Module, tokens: int, keys: int | None = None) -> int:
    """FLOPs of one stock decoder layer (of any base) on `tokens` queries attending to `keys` (default: causal over
    itself); hidden states `[1, tokens, H]`, an additive mask `[1, 1, tokens, keys]`."""
    lm = stock.model.language_model
    layer = lm.layers[0]
    hidden = torch.zeros(1, tokens, stock.config.text_config.hidden_size, dtype=stock.dtype, device=stock.device)
    keys = tokens if keys is None else keys
    mask = torch.ones(1, 1, tokens, keys, dtype=torch.bool, device=stock.device)
    positions = torch.arange(tokens, device=stock.device)[None]
    rope = lm.rotary_emb(hidden, bench_base(stock.config).rope_positions(positions))
    counter = flop_counter_mode()
    mask = torch.zeros(mask.shape, dtype=stock.dtype, device=stock.device)  # eager: an additive float mask
    with counter, torch.no_grad(), eager_attention(stock):
        if keys > tokens:  # attention over a past: emulate it with a key/value prefix through a plain cache
            from transformers import DynamicCache

            cache = DynamicCache()
            heads = stock.config.text_config.num_key_value_heads
            dim = stock.config.text_config.hidden_size // stock.config.text_config.num_attention_heads
            past = torch.zeros(1, heads, keys - tokens, dim, dtype=stock.dtype, device=stock.device)
            cache.update(past, past, 0)
            counter_base = counter.get_total_flops()
            kw = {CACHE_KEY: cache}
            layer(hidden, attention_mask=mask, position_ids=positions, position_embeddings=rope, use_cache=True, **kw)
            return counter.get_total_flops() - counter_base
        layer(hidden, attention_mask=mask, position_ids=positions, position_embeddings=rope)
    return counter.get_total_flops()
