"""The bench at the smallest settings its command allows: a measure it cannot compute is None (JSON null) with a
reason, "n/a (why)" in the table, never a negative time or a rate of nothing."""

import json

from dynamic_llava.bench.run import format_table, run_bench


def _numbers(results):
    """Every (key, value) of results that is a number, nested dicts included."""
    for key, value in results.items():
        if isinstance(value, dict):
            yield from _numbers(value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield key, value


def test_smallest_settings_report_missing_measures_as_missing(tmp_path):
    results = run_bench(
        preset="tiny",
        new_tokens=1,
        repeats=1,
        throughput_batches=[1],
        throughput_tokens=1,
        decode_batch=None,
        count_steps=1,
        long_tokens=[2],
        nocache_tokens=2,
        progress=False,
        out=tmp_path,
    )
    for key, value in _numbers(results):
        if key.endswith("_s"):
            assert value > 0, (key, value)
    # one new token: no decode step, so no decode time and no generated token scored
    for key in ("decode_time_per_token_ours_s", "decode_time_per_token_ratio", "output_text_keep_rate"):
        assert results[key] is None and results["missing"][key], key
    assert results["output_text_scored_tokens"] == 0
    table = format_table(results)
    assert "| observed output-text keep rate | n/a (no generated token was scored" in table
    assert "decode time/token, batch 1 | n/a | n/a | n/a (1 new token(s): no decode step)" in table
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["decode_time_per_token_ratio"] is None and saved["missing"]["decode_time_per_token_ratio"]
    # the regime measures ran, each with its floor
    for key in ("long2_cache_bytes_ratio", "long2_cache_bytes_floor_ratio", "nocache_decode_time_per_token_ratio"):
        assert key in results, key
    assert results["masks_per_step_ours"] <= 2 < results["num_layers"] + 1  # not one mask per layer
