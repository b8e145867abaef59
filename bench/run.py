"""`dynamic-llava bench`: Dynamic-LLaVA vs the stock transformers LLaVA on the same weights, in one process.

Every ratio is ours / stock, measured pair by pair in the same run:

* FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` (matmuls and attention: 2*m*n*k per matmul;
  attention 4*T*K*D per head, with T queries and K keys, whatever the mask). "LLM part" = the decoder layers plus,
  for ours, both predictors; "whole model" adds the vision tower, projector and LM head.
* The floor of a FLOP ratio is what a model would spend on only the kept tokens: stock decoder layers on all N
  tokens below `sparse_layer`, and on the N' kept tokens from it on (no predictor cost):
  floor = sum_{i<l} F_i(N) + sum_{i>=l} F_i(N'). The floor of a KV ratio counts only the kept entries:
  l * N + (L - l) * N' entries, versus L * N.
* KV-cache bytes come from the caches themselves (`stored_bytes()` vs the stock `DynamicCache`'s tensors).
* Times are medians over `--repeats` runs; decode time per token = (time of generate(N) - time of the prefill) / N.
* With random weights the output-text predictor keeps all or nothing, so its last bias is shifted until the median
  margin is 0 (about half kept, the trained behaviour at output_text_keep_rate 0.5); the keep rates actually seen
  are reported. Vision pruning keeps the top int(576 * vision_keep_rate) per image whatever the weights.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging

from ..configuration_dynamic_llava import DynamicLlavaConfig
from ..files import atomic_write_text
from ..hub.folder import parse_dtype
from ..modeling_dynamic_llava import DynamicLlavaForConditionalGeneration
from ..sparse_cache import cache_from_output
from ..training.calibration import calibrate_output_text_bias
from .accounting import cache_bytes, layer_flops, per_layer_flops
from .stock import sparsity_disabled, stock_llava

logger = logging.get_logger(__name__)

PRESETS = {
    # LLaVA-1.5 proportions at a size 2 CPU cores run in minutes: 576 image tokens, 32 layers, sparse_layer 2,
    # ~60 prompt text tokens, the predictor narrowed with the model (7B: 4096 / d 512; here 256 / d 32)
    "llava15-cpu": dict(
        text=dict(
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=32,
            num_attention_heads=8,
            num_key_value_heads=8,
            vocab_size=32064,
            max_position_embeddings=4096,
        ),
        vision=dict(
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
            image_size=336,
            patch_size=14,
        ),
        predictor=dict(predictor_d_model=32, predictor_nhead=2, predictor_dim_feedforward=128, predictor_num_layers=2),
    ),
    # the real LLaVA-1.5-7B / Dynamic-LLaVA-7B shapes (Vicuna-7B, CLIP ViT-L/14-336): for a GPU
    "llava15-7b": dict(
        text=dict(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32064,
            max_position_embeddings=4096,
        ),
        vision=dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
        ),
        predictor=dict(
            predictor_d_model=512, predictor_nhead=8, predictor_dim_feedforward=2048, predictor_num_layers=2
        ),
    ),
}
PROMPT_TEXT_TOKENS = 60
IMAGE_TOKEN_ID = 32000


def preset_model(
    name: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0
) -> DynamicLlavaForConditionalGeneration:
    """A random model of preset `name` (`PRESETS`), sdpa attention, in eval mode."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    spec = PRESETS[name]
    config = DynamicLlavaConfig(
        text_config=dict(model_type="llama", pad_token_id=0, bos_token_id=1, eos_token_id=2, **spec["text"]),
        vision_config=dict(
            model_type="clip_vision_model", projection_dim=spec["vision"]["hidden_size"], **spec["vision"]
        ),
        image_token_index=IMAGE_TOKEN_ID,
        image_seq_length=576,
        sparse_layer=2,
        vision_keep_rate=0.2,
        pad_token_id=0,
        **spec["predictor"],
    )
    for sub in (config, config.text_config, config.vision_config):
        sub._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        model = DynamicLlavaForConditionalGeneration(config)
    return model.to(dtype).eval()


def bench_inputs(
    model: DynamicLlavaForConditionalGeneration, batch_size: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    """`batch_size` rows: BOS, ~35 system tokens, the image, ~25 question tokens (random ids), random images."""
    g = torch.Generator().manual_seed(seed)
    config = model.config
    n_image = config.image_seq_length
    before, after = 36, PROMPT_TEXT_TOKENS - 36
    rows = []
    for _ in range(batch_size):
        text = torch.randint(
            3, min(config.image_token_id, config.text_config.vocab_size), (before + after,), generator=g
        )
        rows.append(
            torch.cat([torch.tensor([1]), text[:before], torch.full((n_image,), config.image_token_id), text[before:]])
        )
    side = config.vision_config.image_size
    return {
        "input_ids": torch.stack(rows).to(model.device),
        "attention_mask": torch.ones(batch_size, rows[0].numel(), dtype=torch.long, device=model.device),
        "pixel_values": torch.randn(batch_size, 3, side, side, generator=g).to(model.device, model.dtype),
    }


# ---- timing ---------------------------------------------------------------------------------------------------


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time of `fn` over `repeats` calls (CUDA work is waited for, so queued kernels are counted)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def reset_peak_rss() -> bool:
    """Reset the process's peak RSS (Linux); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    """The process's peak RSS since the last reset (Linux), or None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def generate(model: torch.nn.Module, inputs: dict[str, torch.Tensor], new_tokens: int, **kwargs: Any) -> Any:
    """Sample exactly `new_tokens` tokens (no EOS stop), returning the generate output with the cache."""
    return model.generate(
        **inputs,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=True,
        top_k=0,
        return_dict_in_generate=True,
        **kwargs,
    )


# ---- the benchmark ----------------------------------------------------------------------------------------------


def run_bench(
    model: DynamicLlavaForConditionalGeneration | str | os.PathLike | None = None,
    preset: str = "llava15-cpu",
    batch_size: int = 1,
    new_tokens: int = 512,
    dtype: str = "float32",
    device: str = "cpu",
    repeats: int = 3,
    out: str | os.PathLike | None = None,
    throughput_batch: int = 8,
    throughput_tokens: int = 64,
    seed: int = 0,
) -> dict[str, Any]:
    """
    Run the benchmark (module docstring) on `model` (a model, a folder, or None: a random model of `preset`) against
    the stock LLaVA on the same weights; progress goes to the logger. Returns the results (`format_table` makes the
    table the command prints); with `out`, also writes `results.json` and the plots there.
    """
    torch_dtype = parse_dtype(dtype) or torch.float32
    if model is None:
        model = preset_model(preset, torch_dtype, device, seed)
    elif isinstance(model, (str, Path)):
        model = DynamicLlavaForConditionalGeneration.from_pretrained(str(model), dtype=torch_dtype).to(device).eval()
    model.generation_config.eos_token_id = None  # same work for both models: exactly N new tokens
    model.generation_config.pad_token_id = 0
    stock = stock_llava(model)
    config = model.config
    text = config.text_config
    num_layers, sparse_layer = text.num_hidden_layers, config.sparse_layer
    inputs = bench_inputs(model, batch_size, seed)
    prompt_len = inputs["input_ids"].shape[1]
    logger.info(
        f"[bench] model: {num_layers} layers, hidden {text.hidden_size}, {config.image_seq_length} image tokens, "
        f"prompt {prompt_len} tokens, batch {batch_size}, {new_tokens} new tokens, {dtype} on {device}"
    )
    calibrate_output_text_bias(
        model,
        bench_inputs(model, 1, seed + 1),
        max_new_tokens=min(new_tokens, 128),
        seed=seed,
        min_new_tokens=min(new_tokens, 128),
        do_sample=True,
        top_k=0,
    )
    results: dict = {
        "machine": platform_summary(device),
        "preset": preset if isinstance(preset, str) else None,
        "batch_size": batch_size,
        "new_tokens": new_tokens,
        "dtype": dtype,
        "prompt_tokens": prompt_len,
        "num_layers": num_layers,
        "sparse_layer": sparse_layer,
    }

    # prefill FLOPs
    with torch.no_grad():
        with per_layer_flops(model) as ours_prefill:
            ours_out = model(**inputs, logits_to_keep=1)
        with per_layer_flops(stock) as stock_prefill:
            stock(**inputs, logits_to_keep=1)
    kept_tokens = int(cache_from_output(ours_out).kept_lengths()[-1].max())
    vision_kept = sum(int(image.numel()) for row in cache_from_output(ours_out).kept_vision_indices for image in row)
    f_full = stock_prefill["layers"][0]
    f_kept = layer_flops(stock, kept_tokens)
    floor = sparse_layer * f_full * batch_size + (num_layers - sparse_layer) * f_kept * batch_size
    results.update(
        prefill_llm_flops_ours=ours_prefill["llm"],
        prefill_llm_flops_stock=stock_prefill["llm"],
        prefill_llm_flops_ratio=ours_prefill["llm"] / stock_prefill["llm"],
        prefill_llm_flops_floor_ratio=floor / stock_prefill["llm"],
        prefill_total_flops_ratio=ours_prefill["total"] / stock_prefill["total"],
        prefill_predictor_flops=ours_prefill["predictors"],
        prefill_tokens_in_sparse_layers=kept_tokens,
        vision_keep_rate=vision_kept / (config.image_seq_length * batch_size),
        prefill_flops_by_layer={"ours": ours_prefill["layers"], "stock": stock_prefill["layers"]},
    )

    # prefill time, and the overhead of our machinery with sparsification off
    def prefill(m):
        with torch.no_grad():
            m(**inputs, logits_to_keep=1)

    prefill(model), prefill(stock)  # warm-up
    t_ours, t_stock = median_time(lambda: prefill(model), repeats), median_time(lambda: prefill(stock), repeats)
    with sparsity_disabled(model):
        t_off = median_time(lambda: prefill(model), repeats)
    results.update(
        prefill_time_ours_s=t_ours,
        prefill_time_stock_s=t_stock,
        prefill_time_ratio=t_ours / t_stock,
        overhead_prefill_time_ratio=t_off / t_stock,
    )
    logger.info(
        f"[bench] prefill: FLOPs ratio {results['prefill_llm_flops_ratio']:.3f} (floor "
        f"{results['prefill_llm_flops_floor_ratio']:.3f}), time ratio {t_ours / t_stock:.3f}"
    )

    # decoding with a cache: KV bytes along the way, time per token
    curve = {"ours": [], "stock": []}

    def track(which):
        def hook(module, args, kwargs, output):
            curve[which].append(cache_bytes(cache_from_output(output)))

        return hook

    def decode_run(m, which=None):
        handle = m.register_forward_hook(track(which), with_kwargs=True) if which else None
        try:
            torch.manual_seed(seed)
            with torch.no_grad():
                return generate(m, inputs, new_tokens)
        finally:
            if handle:
                handle.remove()

    reset_peak_rss()
    ours_gen = decode_run(model, "ours")
    ours_rss = peak_rss_bytes()
    reset_peak_rss()
    stock_gen = decode_run(stock, "stock")
    stock_rss = peak_rss_bytes()
    ours_cache = cache_from_output(ours_gen)
    decisions = torch.cat(ours_cache.output_text_keep)
    results.update(
        output_text_keep_rate=float(decisions.float().mean()) if decisions.numel() else None,
        kv_bytes_ours=ours_cache.stored_bytes(),
        kv_bytes_stock=cache_bytes(cache_from_output(stock_gen)),
        peak_rss_ours_bytes=ours_rss,
        peak_rss_stock_bytes=stock_rss,
        kv_bytes_curve=curve,
    )
    results["kv_bytes_ratio"] = results["kv_bytes_ours"] / results["kv_bytes_stock"]
    kept_entries = ours_cache.kept_lengths()
    floor_entries = int(kept_entries.sum())  # each row's kept entries only: no padding to the longest row
    dense_entries = num_layers * batch_size * (prompt_len + new_tokens - 1)
    results["kv_bytes_floor_ratio"] = floor_entries / dense_entries
    g_ours = median_time(lambda: decode_run(model), repeats)
    g_stock = median_time(lambda: decode_run(stock), repeats)
    with sparsity_disabled(model):
        g_off = median_time(lambda: decode_run(model), repeats)
    per_token = {
        k: (g - t) / new_tokens
        for k, g, t in (("ours", g_ours, t_ours), ("stock", g_stock, t_stock), ("off", g_off, t_off))
    }
    results.update(
        decode_time_per_token_ours_s=per_token["ours"],
        decode_time_per_token_stock_s=per_token["stock"],
        decode_time_per_token_ratio=per_token["ours"] / per_token["stock"],
        overhead_decode_time_ratio=per_token["off"] / per_token["stock"],
    )
    logger.info(
        f"[bench] decode: KV bytes ratio {results['kv_bytes_ratio']:.3f} (floor {results['kv_bytes_floor_ratio']:.3f})"
        f", time/token ratio {results['decode_time_per_token_ratio']:.3f}, output-text keep "
        f"{results['output_text_keep_rate']:.2f}"
    )

    # decoding without a cache: the cost of the next token after N generated ones
    sequence = ours_gen.sequences[:1]
    px = inputs["pixel_values"][:1]
    with torch.no_grad():
        with per_layer_flops(model) as ours_nc:
            nc = model(
                input_ids=sequence, pixel_values=px, use_cache=False, output_text_start=prompt_len, logits_to_keep=1
            )
        with per_layer_flops(stock) as stock_nc:
            stock(input_ids=sequence, pixel_values=px, use_cache=False, logits_to_keep=1)
    sparse_tokens = int((nc.token_indices[0] >= 0).sum()) if nc.token_indices is not None else sequence.shape[1]
    nc_floor = sparse_layer * layer_flops(stock, sequence.shape[1]) + (num_layers - sparse_layer) * layer_flops(
        stock, sparse_tokens
    )
    results.update(
        nocache_decode_flops_ours=ours_nc["llm"],
        nocache_decode_flops_stock=stock_nc["llm"],
        nocache_decode_flops_ratio=ours_nc["llm"] / stock_nc["llm"],
        nocache_decode_flops_floor_ratio=nc_floor / stock_nc["llm"],
    )

    # throughput at batch 1 and `throughput_batch`
    for b in sorted({1, throughput_batch}):
        batch_inputs = bench_inputs(model, b, seed + 2)

        def run(m, batch_inputs=batch_inputs):
            torch.manual_seed(seed)
            with torch.no_grad():
                m.generate(
                    **batch_inputs,
                    max_new_tokens=throughput_tokens,
                    min_new_tokens=throughput_tokens,
                    do_sample=True,
                    top_k=0,
                )

        run(model), run(stock)
        tps_ours = b * throughput_tokens / median_time(lambda: run(model), repeats)
        tps_stock = b * throughput_tokens / median_time(lambda: run(stock), repeats)
        results[f"batch{b}_tokens_per_s_ours"] = tps_ours
        results[f"batch{b}_tokens_per_s_stock"] = tps_stock
        results[f"batch{b}_tokens_per_s_ratio"] = tps_ours / tps_stock

    if out:
        write_outputs(results, Path(out))
    return results


def platform_summary(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    threads = torch.get_num_threads()
    if device != "cpu" and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"CPU {cpu}, {threads} threads (torch {torch.__version__})"


ROWS = [
    ("prefill LLM FLOPs", "prefill_llm_flops_ratio", "prefill_llm_flops_floor_ratio"),
    ("prefill whole-model FLOPs", "prefill_total_flops_ratio", None),
    ("prefill time", "prefill_time_ratio", None),
    ("KV-cache bytes after N tokens", "kv_bytes_ratio", "kv_bytes_floor_ratio"),
    ("decode FLOPs/token, no cache", "nocache_decode_flops_ratio", "nocache_decode_flops_floor_ratio"),
    ("decode time/token, cache", "decode_time_per_token_ratio", None),
    ("tokens/s, batch 1", "batch1_tokens_per_s_ratio", None),
    ("tokens/s, batch 8", "batch8_tokens_per_s_ratio", None),
    ("overhead, prefill time (sparsity off)", "overhead_prefill_time_ratio", None),
    ("overhead, decode time (sparsity off)", "overhead_decode_time_ratio", None),
]


def format_table(results: dict[str, Any]) -> str:
    """The ratios of `results` as a Markdown table (what `dynamic-llava bench` prints)."""
    lines = ["| measure | ours / stock | floor |", "|---|---|---|"]
    for label, key, floor in ROWS:
        if key in results:
            floor_text = f"{results[floor]:.3f}" if floor and floor in results else ""
            lines.append(f"| {label} | {results[key]:.3f} | {floor_text} |")
    lines.append(f"| observed vision keep rate | {results['vision_keep_rate']:.3f} | |")
    if results.get("output_text_keep_rate") is not None:
        lines.append(f"| observed output-text keep rate | {results['output_text_keep_rate']:.3f} | |")
    return "\n".join(lines)


def write_outputs(results: dict[str, Any], folder: str | os.PathLike) -> None:
    """`results.json` and the two plots (`kv_bytes.png`, `prefill_flops_by_layer.png`, with matplotlib) in `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "results.json", json.dumps(results, indent=2) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("[bench] matplotlib is not installed: no plots (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for which, style in (("stock", "-"), ("ours", "-")):
        curve = results["kv_bytes_curve"][which]
        ax.plot(range(len(curve)), [b / 2**20 for b in curve], style, label=which)
    ax.set_xlabel("generated tokens")
    ax.set_ylabel("KV cache (MiB)")
    ax.set_title("KV-cache bytes vs generated length")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "kv_bytes.png", dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    by_layer = results["prefill_flops_by_layer"]
    ax.bar([i - 0.2 for i in range(len(by_layer["stock"]))], [f / 1e9 for f in by_layer["stock"]], 0.4, label="stock")
    ax.bar([i + 0.2 for i in range(len(by_layer["ours"]))], [f / 1e9 for f in by_layer["ours"]], 0.4, label="ours")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("prefill GFLOPs")
    ax.set_title("Prefill FLOPs by layer")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "prefill_flops_by_layer.png", dpi=100)
    plt.close(fig)
