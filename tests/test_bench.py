"""Benchmark accounting on a tiny model: FLOP and byte counts equal hand-computed values (no timing asserted)."""

import json

import pytest
import torch
from transformers import DynamicCache

from dynamic_llava.bench.accounting import cache_bytes, layer_flops, per_layer_flops
from dynamic_llava.bench.run import run_bench
from dynamic_llava.bench.stock import stock_llava
from dynamic_llava.modeling_dynamic_llava import CACHE_KEY

from fixtures.tiny import tiny_inputs, tiny_model

H, HEADS, KV, D, FF = 32, 4, 2, 8, 64  # the tiny model's text shapes (FF: the MLP's intermediate size)


def llama_layer(t, k):
    """Linear layers (q, k, v, o, gate, up, down) on t tokens + attention of t queries over k keys."""
    return 2 * t * (H * H + 2 * H * KV * D + H * H) + 2 * t * 3 * H * FF + 4 * HEADS * t * k * D


def image_predictor(tokens=16, d=16, ff=32):
    down = 2 * tokens * H * d
    block = 2 * tokens * d * 3 * d + 4 * tokens * tokens * d + 2 * tokens * d * d + 2 * 2 * tokens * d * ff
    head = 2 * tokens * (d * d // 2 + d // 2 * d // 4 + d // 4 * 2)
    return down + block + head


def output_text_predictor(d=16):
    return 2 * (H * d + d * d // 2 + d // 2 * d // 4 + d // 4 * 2)


def test_prefill_and_decode_flops_equal_hand_counts():
    model = tiny_model(0)
    inputs = tiny_inputs([(5, 6, 7, 8, 9)])
    n = inputs["input_ids"].shape[1]  # 22 tokens, 16 of them image tokens; 4 image tokens kept (0.25)
    kept = n - 16 + 4
    with torch.no_grad(), per_layer_flops(model) as prefill:
        out = model(**inputs, logits_to_keep=1)
    assert prefill["layers"] == [llama_layer(n, n)] * 2 + [llama_layer(kept, kept)] * 2
    assert prefill["predictors"] == image_predictor()
    assert prefill["llm"] == 2 * llama_layer(n, n) + 2 * llama_layer(kept, kept) + image_predictor()

    # one decode step: dense layers see n + 1 keys; sparse layers read their allocated slots (the kept + 1, and at
    # most one block of empty, masked slots: no slicing op per layer and step)
    step = out.logits[:, -1:].argmax(-1)
    cache = out[CACHE_KEY]
    with torch.no_grad(), per_layer_flops(model) as decode:
        model(input_ids=step, **{CACHE_KEY: cache})
    capacity = cache.table.capacity
    assert kept + 1 <= capacity <= kept + 1 + cache.table.block_size
    assert decode["layers"] == [llama_layer(1, n + 1)] * 2 + [llama_layer(1, capacity)] * 2
    assert decode["predictors"] == output_text_predictor()

    # the stock model on the same input: every layer on all n tokens; the floor helper counts one stock layer
    stock = stock_llava(model)
    with torch.no_grad(), per_layer_flops(stock) as full:
        stock(**inputs, logits_to_keep=1)
    assert full["layers"] == [llama_layer(n, n)] * 4 and full["predictors"] == 0
    assert layer_flops(stock, kept) == llama_layer(kept, kept)
    assert layer_flops(stock, 1, keys=kept + 1) == llama_layer(1, kept + 1)


def test_cache_bytes_equal_hand_counts():
    model = tiny_model(0)
    inputs = tiny_inputs([(5, 6, 7, 8, 9), (10, 11)])  # row 1 is left-padded by 3
    n = inputs["input_ids"].shape[1]
    with torch.no_grad():
        ours = model(**inputs)[CACHE_KEY]
        stock = stock_llava(model)(**inputs, use_cache=True)[CACHE_KEY]
    entry = 2 * KV * D * 4  # key + value, float32
    kept = [n - 16 + 4, n - 3 - 16 + 4]
    assert ours.kept_lengths().tolist() == [[n, n - 3]] * 2 + [kept] * 2
    assert cache_bytes(ours) == ours.stored_bytes() == 2 * 2 * n * entry + 2 * 2 * max(kept) * entry
    assert isinstance(stock, DynamicCache) and cache_bytes(stock) == 4 * 2 * n * entry == ours.dense_bytes()


@pytest.mark.slow
def test_bench_command_writes_results_and_plots(tmp_path):
    model = tiny_model(0)
    results = run_bench(
        model=model, new_tokens=6, repeats=1, out=str(tmp_path), throughput_batch=2, throughput_tokens=3
    )
    saved = json.loads((tmp_path / "results.json").read_text())
    for key in (
        "prefill_llm_flops_ratio",
        "prefill_llm_flops_floor_ratio",
        "kv_bytes_ratio",
        "kv_bytes_floor_ratio",
        "nocache_decode_flops_ratio",
        "overhead_prefill_time_ratio",
        "overhead_decode_time_ratio",
        "decode_time_per_token_ratio",
        "batch2_tokens_per_s_ratio",
        "vision_keep_rate",
        "output_text_keep_rate",
    ):
        assert key in saved, key
    assert saved["vision_keep_rate"] == 0.25
    # the accounting of this run, by hand: prompt 62 tokens (60 text + 16 image - ... see bench_inputs)
    n = results["prompt_tokens"]
    kept = n - 16 + 4
    stock_llm = 4 * llama_layer(n, n)
    assert results["prefill_llm_flops_stock"] == stock_llm
    assert results["prefill_llm_flops_ours"] == 2 * llama_layer(n, n) + 2 * llama_layer(kept, kept) + image_predictor()
    assert results["prefill_llm_flops_floor_ratio"] == (2 * llama_layer(n, n) + 2 * llama_layer(kept, kept)) / stock_llm
    assert (tmp_path / "kv_bytes.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "prefill_flops_by_layer.png").exists()
