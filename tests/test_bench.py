"""Benchmark accounting on a tiny model: FLOP and byte counts equal hand-computed values (no timing asserted)."""

import json

import pytest
import torch
from transformers import DynamicCache

from dynamic_llava.bench.accounting import cache_bytes, layer_flops, per_layer_flops
from dynamic_llava.bench.memory import estimate_largest_batch, search_largest_batch
from dynamic_llava.bench.run import bench_inputs, format_table, run_bench
from dynamic_llava.bench.stock import stock_llava
from dynamic_llava.transformers_compat import CACHE_KEY

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
        model=model,
        new_tokens=6,
        repeats=1,
        out=str(tmp_path),
        throughput_batch=2,
        throughput_tokens=3,
        long_tokens=[4],
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


@pytest.mark.slow  # (the quick loop runs the bench in tests/test_bench_missing.py)
def test_bench_reports_every_new_measure_on_a_tiny_model(caplog):
    """The keys of TTFT, the ragged decode batch, tokens/s per batch, ops and syncs per step, memory per run and
    the budget, with the per-call sparsity options (no timing asserted)."""
    model = tiny_model(0)
    results = run_bench(
        model=model,
        new_tokens=3,
        repeats=1,
        throughput_batches=(1, 2),
        throughput_tokens=2,
        decode_batch=2,
        count_steps=2,
        memory_budget_gb=0.012,
        vision_keep_tokens=2,
        long_tokens=[4],
        budget_tokens=3,
        progress=False,
    )
    for key in (
        "time_to_first_token_ratio",
        "decode_time_per_token_ratio",
        "batch2_decode_time_per_token_ratio",
        "batch2_time_to_first_token_ratio",
        "batch1_tokens_per_s_ratio",
        "batch2_tokens_per_s_ratio",
        "batch1_aten_ops_per_step_ratio",
        "batch2_aten_ops_per_step_ratio",
        "batch1_host_syncs_per_step_extra",
        "batch2_host_syncs_per_step_extra",
        "decode_batch1_footprint_ratio",
        "decode_batch2_footprint_ratio",
        "throughput_batch2_footprint_ratio",
        "peak_rss_ours_bytes",
        "memory_budget_method",
        "max_batch_ours",
        "max_batch_stock",
        "kv_bytes_floor_ratio",
        "prefill_llm_flops_floor_ratio",
        "overhead_decode_time_ratio",
    ):
        assert key in results, key
    assert results["vision_keep_rate"] == 2 / 16  # the per-call budget, not the config's 0.25
    assert results["sparsity"] == {"vision_keep_tokens": 2}
    assert results["ragged_rows"] is True and "compiled_decode_time_per_token_ratio" not in results
    memory = results["memory"]["decode_batch2"]
    assert memory["ours"]["footprint_bytes"] >= results["weight_bytes_ours"] > results["weight_bytes_stock"]
    assert any("repeats=1" in r.getMessage() for r in caplog.records)  # too few repeats for stable timings
    table = format_table(results)
    assert "| time to first token, batch 1 |" in table and "largest batch in 0.012 GiB" in table
    assert json.dumps(results, default=float)
    # every SDPA call of a decode step is counted once by its mask kind and once by the kernel it dispatched to
    for b in (1, 2):
        for side in ("ours", "stock"):
            by_mask = sum(results[f"batch{b}_sdpa_{kind}_masks_per_step_{side}"] for kind in ("float", "bool", "none"))
            kernels = [k for k in results if k.startswith(f"batch{b}_sdpa_kernel_") and k.endswith(f"_{side}")]
            assert kernels and sum(results[k] for k in kernels) == by_mask > 0, (b, side)
    # the prefill by part: ours runs the predictor, stock does not; the floor's prompt has no image
    assert results["prefill_part_predictors_ours_s"] > 0 and "prefill_part_predictors_stock_s" not in results
    assert "prefill_part_vision_floor_s" not in results and results["prefill_part_sparse_layers_floor_s"] > 0
    assert results["prefill_time_vs_parts_floor_ratio"] > 0
    assert "| prefill time by part: image predictor |" in table


def test_ragged_bench_inputs_are_left_padded_rows_of_different_lengths():
    model = tiny_model(0)
    inputs = bench_inputs(model, 3, ragged=True)
    lengths = inputs["attention_mask"].sum(-1).tolist()
    assert lengths[0] == inputs["input_ids"].shape[1] and lengths == [lengths[0] - 3 * i for i in range(3)]
    for row, n in enumerate(lengths):
        assert (inputs["attention_mask"][row, -n:] == 1).all() and (inputs["input_ids"][row, :-n] == 0).all()
        assert int((inputs["input_ids"][row] == model.config.image_token_id).sum()) == 16


def test_memory_budget_search_and_estimate():
    footprints = []

    def footprint(batch):  # 10 bytes of weights, 3 per row; out of memory from 50 rows on
        footprints.append(batch)
        return None if batch >= 50 else 10 + 3 * batch

    assert search_largest_batch(footprint, 100)[0] == 30  # 10 + 3 * 30 = 100
    assert search_largest_batch(footprint, 1000)[0] == 49  # the out-of-memory probes do not fit
    assert search_largest_batch(footprint, 12)[0] == 0
    best, probes = search_largest_batch(footprint, 100, start=29)
    assert best == 30 and len(probes) < 10  # fewer probes than from batch 1
    assert estimate_largest_batch({1: 13, 8: 34}, 100) == 30
    assert estimate_largest_batch({1: 13}, 100) is None


@pytest.mark.slow
def test_gpu_bench_script_dry_run(tmp_path):
    """scripts/gpu_bench.sh --dry-run: the GPU run's script on the CPU with the tiny preset, results under $OUT."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_bench.sh"
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    done = subprocess.run(["bash", str(script), "--dry-run"], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["preset"] == "tiny" and "long32_cache_bytes_ratio" in saved and "max_batch_ours" in saved
    table = (tmp_path / "table.md").read_text()
    assert "| long generation: cache bytes after 32 tokens, batch 1 |" in table
    assert "| long generation: cache bytes after 32 tokens, batch 2 ragged |" in table
    # ours' kept entries fit in its storage (rows are padded to the longest kept row, never cut); batch 1 has no
    # padding, so its entries are its storage
    for k in (16, 32):
        assert saved[f"long{k}_b2_cache_entry_bytes_ratio"] <= saved[f"long{k}_b2_cache_bytes_ratio"]
        assert saved[f"long{k}_cache_entry_bytes_ratio"] == saved[f"long{k}_cache_bytes_ratio"]
        assert saved[f"long{k}_b2_decode_time_no_context_ratio"] > 0
    assert "stock with no context / stock (no pruning goes below), batch 2 ragged |" in table
