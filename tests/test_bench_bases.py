"""The bench on every base of the registry (LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL), at each base's tiny preset: its
prompts hold the image tokens the model makes of the image, the stock model is the base's own class on the same
weights, and the FLOP and KV-byte ratios sit at their floors (only the kept work) within 3%. No timing asserted."""

from __future__ import annotations

import json

import pytest
import torch

from dynamic_llava.bench.bases import BENCH_BASES, bench_base
from dynamic_llava.bench.context import bench_inputs, preset_model
from dynamic_llava.bench.presets import PRESETS
from dynamic_llava.bench.run import format_table, run_bench
from dynamic_llava.bench.stock import stock_model
from dynamic_llava.hub.bases import BASES

# base -> its tiny preset (tests/fixtures/bases.py's shapes, a run in seconds)
TINY = {"llava": "tiny", "llava_next": "llava-next-tiny", "qwen2_5_vl": "qwen2-5-vl-tiny"}
# base -> its CPU preset (the base's real image-token counts at reduced width)
CPU = {"llava": "llava15-cpu", "llava_next": "llava-next-cpu", "qwen2_5_vl": "qwen2-5-vl-cpu"}
STOCK_CLASSES = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
}
MINIMAL = dict(
    new_tokens=4,
    repeats=1,
    throughput_batches=[1],
    throughput_tokens=2,
    decode_batch=None,
    count_steps=0,
    long_tokens=(),
    nocache_tokens=0,
    progress=False,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny presets on one thread (tests/conftest.py sets two): threads of ops this small only wait on each other,
    and on a busy machine a run in seconds then takes tens of seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_every_base_of_the_registry_has_a_tiny_and_a_cpu_preset():
    assert set(TINY) == set(CPU) == set(BASES)
    for base, names in {b: (TINY[b], CPU[b]) for b in BASES}.items():
        assert all(PRESETS[name]["base"] == base for name in names)


@pytest.mark.parametrize("base", sorted(BASES))
def test_bench_prompts_hold_the_image_tokens_the_model_makes_of_the_image(base):
    """Ragged left-padded rows, one image each, with as many placeholders as the base's model packs for the image
    (NeXT: its anyres count for `image_sizes`; Qwen: t * h * w / merge**2 of `image_grid_thw`); stock runs them."""
    model = preset_model(TINY[base])
    inputs = bench_inputs(model, 3, ragged=True, image_size=PRESETS[TINY[base]].get("image"))
    config = model.config
    expected = {
        "llava": lambda: config.image_seq_length,
        "llava_next": lambda: model.model.image_token_counts(inputs["image_sizes"][:1], "default")[0],
        "qwen2_5_vl": lambda: int(inputs["image_grid_thw"][0].prod()) // config.vision_config.spatial_merge_size**2,
    }[base]()
    assert expected == {"llava": 16, "llava_next": 72, "qwen2_5_vl": 64}[base]
    lengths = inputs["attention_mask"].sum(-1).tolist()
    assert lengths == [lengths[0] - 3 * i for i in range(3)] and lengths[0] == inputs["input_ids"].shape[1]
    for row, n in enumerate(lengths):
        assert (inputs["input_ids"][row, :-n] == 0).all()
        assert int((inputs["input_ids"][row] == config.image_token_id).sum()) == expected
    with torch.no_grad():
        stock_model(model)(**inputs, logits_to_keep=1)  # (stock checks the placeholders against the features)


@pytest.mark.parametrize("base", sorted(BASES))
def test_the_stock_model_of_each_base_is_its_stock_class_on_the_same_weights(base):
    model = preset_model(TINY[base])
    stock = stock_model(model)
    assert type(stock).__name__ == STOCK_CLASSES[base] and not type(stock).__module__.startswith("dynamic_llava")
    inputs = bench_inputs(model, 1, image_size=PRESETS[TINY[base]].get("image"))
    with torch.no_grad():
        ours = model(**inputs, use_vision_predictor=False, use_output_text_predictor=False).logits
        theirs = stock(**inputs).logits
    assert (ours - theirs).abs().max().item() <= 1e-5


@pytest.mark.slow  # (bench runs: the quick loop keeps the scorer-missing one and tests/test_bench_missing.py)
@pytest.mark.parametrize("base", sorted(BASES))
def test_the_bench_on_each_bases_tiny_preset_reports_ratios_at_their_floors(base):
    """Prefill LLM FLOPs and KV bytes within 3% of their floors, the time ratios against the base's stock class, and
    the attention scorer's prefill FLOPs and time beside ours."""
    results = run_bench(preset=TINY[base], **MINIMAL)
    assert results["base"] == base
    # only a timing can be missing (3 decode steps on a busy machine may not be above the noise), with its reason
    assert all("time" in key and reason for key, reason in results["missing"].items()), results["missing"]
    for key in ("prefill_llm_flops", "kv_bytes"):
        ratio, floor = results[f"{key}_ratio"], results[f"{key}_floor_ratio"]
        assert floor <= ratio <= 1.03 * floor < 1, (key, ratio, floor)
    for key in (
        "prefill_time_ratio",
        "time_to_first_token_ratio",
        "decode_time_per_token_ratio",
        "attention_scorer_prefill_time_ratio",
    ):
        assert key in results and (results[key] is None) == (key in results["missing"]), key
        assert results[key] is None or results[key] > 0, key
    # the attention scorer keeps as many tokens as the predictor; its recomputed attention is counted on top
    assert results["attention_scorer_prefill_tokens_in_sparse_layers"] == results["prefill_tokens_in_sparse_layers"]
    assert results["attention_scorer_flops"] > 0
    assert results["attention_scorer_prefill_llm_flops_floor_ratio"] == results["prefill_llm_flops_floor_ratio"]
    assert results["prefill_llm_flops_floor_ratio"] < results["attention_scorer_prefill_llm_flops_ratio"] < 1
    table = format_table(results)
    assert "| prefill LLM FLOPs, attention scorer (FastV) |" in table and "| prefill time, attention scorer" in table
    assert json.dumps(results, default=float)


def test_the_attention_scorer_is_reported_missing_when_vision_pruning_is_off():
    results = run_bench(preset="qwen2-5-vl-tiny", use_vision_predictor=False, **MINIMAL)
    for key in ("attention_scorer_prefill_llm_flops_ratio", "attention_scorer_prefill_time_ratio"):
        assert results[key] is None and "attention scorer cannot run" in results["missing"][key]
    assert "| prefill time, attention scorer (FastV) | n/a | n/a | n/a (the attention scorer" in format_table(results)


@pytest.mark.slow  # (bench runs: the quick loop keeps the scorer-missing one and tests/test_bench_missing.py)
@pytest.mark.parametrize("base", ["llava_next", "qwen2_5_vl"])
def test_the_bench_loads_a_folder_of_any_base_through_the_registry(base, tmp_path):
    model = preset_model(TINY[base])
    model.save_pretrained(tmp_path)
    # without a preset, the base's own bench image: NeXT a 480 x 640 photo scaled to its 56-px tiles, Qwen 46 x 46
    # patches (644 x 644 px at patch 14)
    assert (
        bench_base(model.config).image_size(model.config, None)
        == {"llava_next": (80, 107), "qwen2_5_vl": (644, 644)}[base]
    )
    results = run_bench(model=str(tmp_path), image_size=PRESETS[TINY[base]]["image"], **MINIMAL)
    assert results["base"] == base and results["preset"] is None
    assert results["kv_bytes_floor_ratio"] <= results["kv_bytes_ratio"] <= 1.03 * results["kv_bytes_floor_ratio"]


@pytest.mark.parametrize(
    ("preset", "image_size", "message"),
    [
        (
            "qwen2-5-vl-tiny",
            (100, 100),
            r"multiples of patch_size \* spatial_merge_size = 28 px .* e\.g\. \(112, 112\)",
        ),
        ("tiny", (64, 64), r"a LLaVA-1\.5 image is always 32 x 32 pixels .* pass image_size=None"),
        ("llava-next-tiny", (0, 10), r"pass a positive \(height, width\)"),
    ],
)
def test_an_image_size_the_base_cannot_take_is_refused_naming_the_fix(preset, image_size, message):
    with pytest.raises(ValueError, match=message):
        run_bench(preset=preset, image_size=image_size, **MINIMAL)


@pytest.mark.parametrize("base", ["llava_next", "qwen2_5_vl"])
def test_the_cpu_presets_have_their_bases_real_image_token_counts(base):
    """llava-next-cpu: a 480 x 640 image is 576 + 36 x 48 + 36 newlines = 2,340 tokens; qwen2-5-vl-cpu: 644 x 644 px
    is 46 x 46 patches = 529 tokens (the counts the bases' real models make of those images)."""
    spec = PRESETS[CPU[base]]
    config = BENCH_BASES[base].build_config(spec)
    model_class = BASES[base].load_model_class()
    with torch.device("meta"):  # (the shapes only: no weights allocated)
        model = model_class(config)
    adapter = bench_base(config)
    tokens = adapter.image_tokens(model, adapter.image_size(config, spec["image"]))
    assert tokens == {"llava_next": 2340, "qwen2_5_vl": 529}[base]


@pytest.mark.slow  # (bench runs: the quick loop keeps the scorer-missing one and tests/test_bench_missing.py)
def test_bench_command_runs_a_preset_of_another_base(capsys):
    from dynamic_llava.cli import main

    flags = ["--new-tokens", "3", "--repeats", "1", "--decode-batch", "0", "--count-steps", "0", "--no-long"]
    flags += ["--nocache-tokens", "0", "--batch-sizes", "1", "--throughput-tokens", "2", "--no-progress"]
    assert main(["bench", "--preset", "llava-next-tiny", *flags]) == 0
    table = capsys.readouterr().out
    assert "| prefill LLM FLOPs |" in table and "| prefill LLM FLOPs, attention scorer (FastV) |" in table
