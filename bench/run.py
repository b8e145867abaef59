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
* Times are medians over `--repeats` runs, after one untimed warm-up run. Time to first token = a whole
  `generate(max_new_tokens=1)` (prefill and the first token); decode time per token = (time of generate(N) - time
  to first token) / (N - 1). Tokens/s = batch * N / time of generate(N) (the throughput runs, N = 64 by default).
* Batches of more than one row are ragged by default: rows of different prompt lengths (the question shortened by
  3 tokens per row, cycling over 8 lengths), left padded, as a server batches requests.
* Aten ops and host syncs per decode step: (generate(1 + S) - generate(1)) / S, counted by the dispatcher
  (`bench.counting`); a host sync is a tensor -> Python conversion or a copy from an accelerator to the host.
* Memory (`bench.memory`): per run and model, the absolute peaks (peak RSS; on CUDA `max_memory_allocated`) and the
  footprint = the model's own weights + the growth of the peak during its run (what it needs alone; both models are
  loaded in this process). `memory_budget_gb`: the largest batch whose footprint with N new tokens fits. On CUDA it
  is measured (doubling then bisection, each probe a real generate, an out-of-memory probe does not fit); on the CPU
  there is no allocator peak, so it is estimated by a line through the footprints of the decode runs at batch 1 and
  at the ragged decode batch.
* Compiled (`compiled=True`; default on CUDA only, a compile takes minutes on a small CPU): ours with
  `cache_implementation="static"` (`DynamicLlavaStaticCache`) against stock with transformers' `StaticCache`, both
  through generate()'s own `torch.compile` of the decode step (a `CompileConfig`; on the CPU with
  `_compile_all_devices`); prefill eager, as generate() does it. The compile wall time is the first run minus a
  steady one (summed over the shapes compiled: each batch size and cache length compiles once). Its memory is that
  of a steady run on the CPU (compiling takes memory), of the first run on CUDA (where CUDA graphs take their pool).
  "Fastest" compares the faster of eager and compiled, ours against stock's.
* With random weights the output-text predictor keeps all or nothing, so its last bias is shifted until the median
  margin is 0 (about half kept, the trained behaviour at output_text_keep_rate 0.5); the keep rates actually seen
  are reported. Vision pruning keeps the top int(576 * vision_keep_rate) per image whatever the weights.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers.utils import logging

from ..configuration_dynamic_llava import DynamicLlavaConfig
from ..files import atomic_write_text
from ..hub.folder import parse_dtype
from ..modeling_dynamic_llava import DynamicLlavaForConditionalGeneration
from ..sparse_cache import cache_from_output
from ..training.calibration import calibrate_output_text_bias
from .accounting import cache_bytes, layer_flops, per_layer_flops
from .counting import per_decode_step
from .memory import (
    estimate_largest_batch,
    footprint_bytes,
    peak_memory,
    peak_rss_bytes,
    reset_peak_rss,
    search_largest_batch,
    weight_bytes,
)
from .stock import stock_llava

__all__ = [
    "PRESETS",
    "bench_inputs",
    "format_table",
    "median_time",
    "peak_rss_bytes",
    "preset_model",
    "reset_peak_rss",
    "run_bench",
    "write_outputs",
]

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
RAGGED_STEP = 3  # tokens the question of each further row is shortened by (cycling over RAGGED_LENGTHS rows)
RAGGED_LENGTHS = 8
THROUGHPUT_BATCHES = (1, 8, 32)
GiB = 2**30


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
    model: DynamicLlavaForConditionalGeneration, batch_size: int, seed: int = 0, ragged: bool = False
) -> dict[str, torch.Tensor]:
    """
    `batch_size` rows: BOS, ~35 system tokens, the image, ~25 question tokens (random ids), random images. With
    `ragged`, row i's question is `3 * (i % 8)` tokens shorter and the rows are left padded (pad id 0).
    """
    g = torch.Generator().manual_seed(seed)
    config = model.config
    n_image = config.image_seq_length
    before, after = 36, PROMPT_TEXT_TOKENS - 36
    rows = []
    for i in range(batch_size):
        text = torch.randint(
            3, min(config.image_token_id, config.text_config.vocab_size), (before + after,), generator=g
        )
        question = after - (RAGGED_STEP * (i % RAGGED_LENGTHS) if ragged else 0)
        rows.append(
            torch.cat(
                [
                    torch.tensor([1]),
                    text[:before],
                    torch.full((n_image,), config.image_token_id),
                    text[before : before + question],
                ]
            )
        )
    width = max(row.numel() for row in rows)
    input_ids = torch.zeros(batch_size, width, dtype=torch.long)
    attention_mask = torch.zeros(batch_size, width, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - row.numel() :] = row
        attention_mask[i, width - row.numel() :] = 1
    side = config.vision_config.image_size
    return {
        "input_ids": input_ids.to(model.device),
        "attention_mask": attention_mask.to(model.device),
        "pixel_values": torch.randn(batch_size, 3, side, side, generator=g).to(model.device, model.dtype),
    }


# ---- timing ---------------------------------------------------------------------------------------------------


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time of `fn` over `repeats` calls (CUDA work is waited for, so queued kernels are counted)."""
    times = []
    for _ in range(repeats):
        _synchronize()
        start = time.perf_counter()
        fn()
        _synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def wall_time(fn: Callable[[], Any]) -> tuple[Any, float]:
    """`fn()` and its wall time (CUDA work waited for)."""
    _synchronize()
    start = time.perf_counter()
    result = fn()
    _synchronize()
    return result, time.perf_counter() - start


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


def compile_config(device: str, mode: str | None = None) -> Any:
    """generate()'s compile settings for the compiled runs: dynamic=False, transformers' default mode on CUDA
    (reduce-overhead), inductor's default elsewhere, where generate() only compiles with `_compile_all_devices`."""
    from transformers.generation import CompileConfig

    cuda = torch.device(device).type == "cuda"
    config = CompileConfig(fullgraph=False, dynamic=False, mode=mode or ("reduce-overhead" if cuda else "default"))
    if not cuda:
        config._compile_all_devices = True
    return config


# ---- the benchmark ----------------------------------------------------------------------------------------------


class _Phases:
    """The bench's phases as a tqdm progress bar (to stderr, as transformers shows them), and log lines."""

    def __init__(self, names: list[str], enabled: bool):
        self.bar = logging.tqdm(total=len(names), desc="bench", unit="phase", disable=not enabled, file=sys.stderr)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.bar.set_description(f"bench: {name}")
        start = time.perf_counter()
        yield
        logger.info(f"[bench] {name}: {time.perf_counter() - start:.1f} s")
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


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
    throughput_batches: Sequence[int] | None = None,
    decode_batch: int | None = 8,
    ragged: bool = True,
    compiled: bool | None = None,
    compile_batches: Sequence[int] | None = None,
    compile_mode: str | None = None,
    memory_budget_gb: float | None = None,
    count_steps: int = 64,
    vision_keep_tokens: int | None = None,
    vision_keep_rate: float | None = None,
    use_vision_predictor: bool | None = None,
    use_output_text_predictor: bool | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """
    Run the benchmark (module docstring) on `model` (a model, a folder, or None: a random model of `preset`) against
    the stock LLaVA on the same weights; progress goes to a tqdm bar and the logger. Returns the results
    (`format_table` makes the table the command prints); with `out`, also writes `results.json` and the plots there.

    Args:
        batch_size, new_tokens: the main run (FLOPs, KV bytes, prefill, time to first token, decode time per token).
        throughput_batches: batch sizes of the tokens/s runs (`throughput_tokens` new tokens each); default
            1, `throughput_batch` and 32.
        decode_batch: a second decode run over `new_tokens` at this batch (time per token, memory); None: none.
        ragged: batches of more than one row have rows of different lengths, left padded.
        compiled: also run both models compiled with static caches (default: on CUDA only); `compile_batches`:
            batch sizes of its tokens/s runs (default: `throughput_batches` on CUDA, none on the CPU; its decode time
            per token always runs at `batch_size`); `compile_mode`: the `torch.compile` mode.
        memory_budget_gb: find the largest batch whose footprint with `new_tokens` new tokens fits, ours and stock.
        count_steps: decode steps over which aten ops and host syncs per step are counted (0: not counted).
        vision_keep_tokens, vision_keep_rate, use_vision_predictor, use_output_text_predictor: ours' sparsity per
            call, as `generate()` takes them (None: the config's).
    """
    if new_tokens < 2:
        raise ValueError(
            f"new_tokens must be >= 2 (time per token = (generate(N) - generate(1)) / (N - 1)), got {new_tokens}"
        )
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if repeats < 3:
        logger.warning(
            f"[bench] repeats={repeats}: medians of fewer than 3 runs are not stable timings (a run moves by several "
            "percent on a busy machine); use --repeats 3 or more for numbers to report."
        )
    torch_dtype = parse_dtype(dtype) or torch.float32
    if model is None:
        model = preset_model(preset, torch_dtype, device, seed)
    elif isinstance(model, (str, Path)):
        model = DynamicLlavaForConditionalGeneration.from_pretrained(str(model), dtype=torch_dtype).to(device).eval()
        preset = None
    else:
        preset = None
    device = str(model.device)
    cuda = model.device.type == "cuda"
    sparsity = {
        key: value
        for key, value in dict(
            vision_keep_tokens=vision_keep_tokens,
            vision_keep_rate=vision_keep_rate,
            use_vision_predictor=use_vision_predictor,
            use_output_text_predictor=use_output_text_predictor,
        ).items()
        if value is not None
    }
    settings = model.config.sparsity_settings(**sparsity)  # checked before anything runs
    off = dict(use_vision_predictor=False, use_output_text_predictor=False)
    if throughput_batches is None:
        throughput_batches = sorted({1, throughput_batch, *THROUGHPUT_BATCHES[2:]})
    throughput_batches = sorted({int(b) for b in throughput_batches})
    compiled = cuda if compiled is None else compiled
    if compile_batches is None:
        compile_batches = throughput_batches if cuda else ()
    compile_batches = sorted({int(b) for b in compile_batches})
    decode_batch = decode_batch if decode_batch and decode_batch != batch_size else None

    model.generation_config.eos_token_id = None  # same work for both models: exactly N new tokens
    model.generation_config.pad_token_id = 0
    stock = stock_llava(model)
    weights = {"ours": weight_bytes(model), "stock": weight_bytes(stock)}
    models = {"ours": model, "stock": stock, "off": model}
    kwargs_of = {"ours": sparsity, "stock": {}, "off": off}
    config = model.config
    text = config.text_config
    num_layers, sparse_layer = text.num_hidden_layers, config.sparse_layer
    inputs = bench_inputs(model, batch_size, seed, ragged=ragged)
    prompt_len = inputs["input_ids"].shape[1]
    logger.info(
        f"[bench] model: {num_layers} layers, hidden {text.hidden_size}, {config.image_seq_length} image tokens, "
        f"prompt {prompt_len} tokens, batch {batch_size}, {new_tokens} new tokens, {dtype} on {device}"
    )
    names = ["calibrate", "prefill FLOPs", "prefill time", "decode", "no-cache decode FLOPs"]
    names += [f"decode batch {decode_batch}"] if decode_batch else []
    names += ["ops and syncs per step"] if count_steps else []
    names += [f"tokens/s batch {b}" for b in throughput_batches]
    names += ["compiled"] if compiled else []
    names += ["memory budget"] if memory_budget_gb else []
    phase = _Phases(names, progress)

    results: dict = {
        "machine": platform_summary(device),
        "transformers": transformers.__version__,
        "preset": preset if isinstance(preset, str) else None,
        "batch_size": batch_size,
        "new_tokens": new_tokens,
        "dtype": dtype,
        "repeats": repeats,
        "ragged_rows": ragged,
        "sparsity": sparsity,
        "prompt_tokens": prompt_len,
        "num_layers": num_layers,
        "sparse_layer": sparse_layer,
        "weight_bytes_ours": weights["ours"],
        "weight_bytes_stock": weights["stock"],
        "memory": {},
    }

    def record_memory(run: str, which: str, record: dict) -> None:
        record = dict(record, footprint_bytes=footprint_bytes(record, weights[which]))
        results["memory"].setdefault(run, {})[which] = record
        both = results["memory"][run]
        if len(both) == 2 and both["ours"]["footprint_bytes"] and both["stock"]["footprint_bytes"]:
            results[f"{run}_footprint_ratio"] = both["ours"]["footprint_bytes"] / both["stock"]["footprint_bytes"]

    def gen(which: str, batch_inputs: dict, n: int, **extra: Any) -> Callable[[], Any]:
        def run() -> Any:
            torch.manual_seed(seed)
            with torch.no_grad():
                return generate(models[which], batch_inputs, n, **kwargs_of[which], **extra)

        return run

    try:
        with phase("calibrate"):
            if settings.use_output_text_predictor:
                calibrate_output_text_bias(
                    model,
                    bench_inputs(model, 1, seed + 1),
                    max_new_tokens=min(new_tokens, 128),
                    seed=seed,
                    min_new_tokens=min(new_tokens, 128),
                    do_sample=True,
                    top_k=0,
                    **sparsity,
                )

        with phase("prefill FLOPs"):
            with torch.no_grad():
                with per_layer_flops(model) as ours_prefill:
                    ours_out = model(**inputs, logits_to_keep=1, **sparsity)
                with per_layer_flops(stock) as stock_prefill:
                    stock(**inputs, logits_to_keep=1)
            prefill_cache = cache_from_output(ours_out)
            kept_tokens = int(prefill_cache.kept_lengths()[-1].max())
            vision_kept = sum(int(image.numel()) for row in prefill_cache.kept_vision_indices for image in row)
            f_full = stock_prefill["layers"][0]
            f_kept = layer_flops(stock, kept_tokens)
            floor = sparse_layer * f_full * batch_size + (num_layers - sparse_layer) * f_kept * batch_size
            results.update(
                prefill_llm_flops_ours=ours_prefill["llm"],
                prefill_llm_flops_stock=stock_prefill["llm"],
                prefill_llm_flops_ratio=ours_prefill["llm"] / stock_prefill["llm"],
                prefill_llm_flops_floor_ratio=floor / stock_prefill["llm"],
                prefill_total_flops_ours=ours_prefill["total"],
                prefill_total_flops_stock=stock_prefill["total"],
                prefill_total_flops_ratio=ours_prefill["total"] / stock_prefill["total"],
                prefill_predictor_flops=ours_prefill["predictors"],
                prefill_tokens_in_sparse_layers=kept_tokens,
                vision_keep_rate=vision_kept / (config.image_seq_length * batch_size),
                prefill_flops_by_layer={"ours": ours_prefill["layers"], "stock": stock_prefill["layers"]},
            )
            del ours_out, prefill_cache

        # prefill time (a forward), time to first token (a generate of one token), and the overhead of our
        # machinery with sparsification off
        with phase("prefill time"):

            def prefill(m, **kw):
                with torch.no_grad():
                    m(**inputs, logits_to_keep=1, **kw)

            prefill(model, **sparsity), prefill(stock), prefill(model, **off)  # warm-up
            t_ours = median_time(lambda: prefill(model, **sparsity), repeats)
            t_stock = median_time(lambda: prefill(stock), repeats)
            t_off = median_time(lambda: prefill(model, **off), repeats)
            first = {which: gen(which, inputs, 1) for which in ("ours", "stock", "off")}
            for fn in first.values():
                fn()
            ttft = {which: median_time(fn, repeats) for which, fn in first.items()}
            results.update(
                prefill_time_ours_s=t_ours,
                prefill_time_stock_s=t_stock,
                prefill_time_ratio=t_ours / t_stock,
                overhead_prefill_time_ratio=t_off / t_stock,
                time_to_first_token_ours_s=ttft["ours"],
                time_to_first_token_stock_s=ttft["stock"],
                time_to_first_token_ratio=ttft["ours"] / ttft["stock"],
            )
            logger.info(
                f"[bench] prefill: FLOPs ratio {results['prefill_llm_flops_ratio']:.3f} (floor "
                f"{results['prefill_llm_flops_floor_ratio']:.3f}), time ratio {t_ours / t_stock:.3f}, time to first "
                f"token ratio {results['time_to_first_token_ratio']:.3f}"
            )

        # decoding with a cache: KV bytes along the way, memory, time per token
        with phase("decode"):
            curve = {"ours": [], "stock": []}

            def track(which):
                def hook(module, args, kwargs, output):
                    curve[which].append(cache_bytes(cache_from_output(output)))

                return hook

            generated = {}
            for which in ("ours", "stock"):
                handle = models[which].register_forward_hook(track(which), with_kwargs=True)
                try:
                    with peak_memory(device) as record:
                        generated[which] = gen(which, inputs, new_tokens)()
                finally:
                    handle.remove()
                record_memory(f"decode_batch{batch_size}", which, record)
            ours_cache = cache_from_output(generated["ours"])
            decisions = torch.cat(ours_cache.output_text_keep)
            memory = results["memory"][f"decode_batch{batch_size}"]
            results.update(
                output_text_keep_rate=float(decisions.float().mean()) if decisions.numel() else None,
                kv_bytes_ours=ours_cache.stored_bytes(),
                kv_bytes_allocated_ours=ours_cache.allocated_bytes(),
                kv_bytes_stock=cache_bytes(cache_from_output(generated["stock"])),
                peak_rss_ours_bytes=memory["ours"]["peak_rss_bytes"],
                peak_rss_stock_bytes=memory["stock"]["peak_rss_bytes"],
                kv_bytes_curve=curve,
            )
            if cuda:
                results.update(
                    peak_cuda_ours_bytes=memory["ours"]["cuda_peak_bytes"],
                    peak_cuda_stock_bytes=memory["stock"]["cuda_peak_bytes"],
                )
            results["kv_bytes_ratio"] = results["kv_bytes_ours"] / results["kv_bytes_stock"]
            kept_entries = ours_cache.kept_lengths()
            floor_entries = int(kept_entries.sum())  # each row's kept entries only: no padding to the longest row
            dense_entries = num_layers * batch_size * (prompt_len + new_tokens - 1)
            results["kv_bytes_floor_ratio"] = floor_entries / dense_entries
            sequence = generated["ours"].sequences[:1]
            del generated, ours_cache
            runs = {which: gen(which, inputs, new_tokens) for which in ("ours", "stock", "off")}
            runs["off"]()  # (ours and stock are warm from the runs above)
            per_token = {k: (median_time(fn, repeats) - ttft[k]) / (new_tokens - 1) for k, fn in runs.items()}
            results.update(
                decode_time_per_token_ours_s=per_token["ours"],
                decode_time_per_token_stock_s=per_token["stock"],
                decode_time_per_token_ratio=per_token["ours"] / per_token["stock"],
                overhead_decode_time_ratio=per_token["off"] / per_token["stock"],
            )
            logger.info(
                f"[bench] decode: KV bytes ratio {results['kv_bytes_ratio']:.3f} (floor "
                f"{results['kv_bytes_floor_ratio']:.3f}), time/token ratio {results['decode_time_per_token_ratio']:.3f}"
                + (
                    f", output-text keep {results['output_text_keep_rate']:.2f}"
                    if results["output_text_keep_rate"] is not None
                    else ""
                )
            )

        # decoding without a cache: the cost of the next token after N generated ones
        with phase("no-cache decode FLOPs"):
            px = inputs["pixel_values"][:1]
            real = inputs["attention_mask"][0].bool()
            sequence = sequence[:, torch.cat([real, torch.ones(new_tokens, dtype=torch.bool, device=real.device)])]
            start = int(real.sum())
            with torch.no_grad():
                with per_layer_flops(model) as ours_nc:
                    nc = model(
                        input_ids=sequence,
                        pixel_values=px,
                        use_cache=False,
                        output_text_start=start,
                        logits_to_keep=1,
                        **sparsity,
                    )
                with per_layer_flops(stock) as stock_nc:
                    stock(input_ids=sequence, pixel_values=px, use_cache=False, logits_to_keep=1)
            if nc.token_indices is not None:
                sparse_tokens = int((nc.token_indices[0] >= 0).sum())
            else:
                sparse_tokens = sequence.shape[1]
            nc_floor = sparse_layer * layer_flops(stock, sequence.shape[1]) + (num_layers - sparse_layer) * (
                layer_flops(stock, sparse_tokens)
            )
            results.update(
                nocache_decode_flops_ours=ours_nc["llm"],
                nocache_decode_flops_stock=stock_nc["llm"],
                nocache_decode_flops_ratio=ours_nc["llm"] / stock_nc["llm"],
                nocache_decode_flops_floor_ratio=nc_floor / stock_nc["llm"],
            )
            del nc

        # a second decode run at a larger (ragged) batch: time per token, time to first token, memory
        if decode_batch:
            with phase(f"decode batch {decode_batch}"):
                batch_inputs = bench_inputs(model, decode_batch, seed + 3, ragged=ragged)
                times = {}
                for which in ("ours", "stock"):
                    with peak_memory(device) as record:
                        gen(which, batch_inputs, new_tokens)()  # warm-up, and the memory of this run
                    record_memory(f"decode_batch{decode_batch}", which, record)
                    one = gen(which, batch_inputs, 1)
                    one()
                    times[which] = (
                        median_time(one, repeats),
                        median_time(gen(which, batch_inputs, new_tokens), repeats),
                    )
                key = f"batch{decode_batch}"
                for which, (t1, tn) in times.items():
                    results[f"{key}_time_to_first_token_{which}_s"] = t1
                    results[f"{key}_decode_time_per_token_{which}_s"] = (tn - t1) / (new_tokens - 1)
                for measure in ("time_to_first_token", "decode_time_per_token"):
                    results[f"{key}_{measure}_ratio"] = (
                        results[f"{key}_{measure}_ours_s"] / results[f"{key}_{measure}_stock_s"]
                    )
                logger.info(
                    f"[bench] decode at batch {decode_batch}{' (ragged rows)' if ragged else ''}: time/token ratio "
                    f"{results[f'{key}_decode_time_per_token_ratio']:.3f}"
                )

        # dispatched aten ops and host syncs per decode step
        if count_steps:
            with phase("ops and syncs per step"):
                for b in sorted({batch_size, decode_batch or batch_size}):
                    batch_inputs = inputs if b == batch_size else bench_inputs(model, b, seed + 3, ragged=ragged)
                    counts = {
                        which: per_decode_step(
                            models[which], batch_inputs, count_steps, do_sample=True, top_k=0, seed=seed, **kw
                        )
                        for which, kw in kwargs_of.items()
                        if which != "off"
                    }
                    for which, count in counts.items():
                        results[f"batch{b}_aten_ops_per_step_{which}"] = count["ops"]
                        results[f"batch{b}_host_syncs_per_step_{which}"] = count["syncs"]
                    results[f"batch{b}_aten_ops_per_step_ratio"] = counts["ours"]["ops"] / counts["stock"]["ops"]
                    results[f"batch{b}_host_syncs_per_step_extra"] = counts["ours"]["syncs"] - counts["stock"]["syncs"]
                    if counts["stock"]["syncs"]:
                        results[f"batch{b}_host_syncs_per_step_ratio"] = (
                            counts["ours"]["syncs"] / counts["stock"]["syncs"]
                        )
                results["count_steps"] = count_steps

        # throughput: tokens/s at each batch
        for b in throughput_batches:
            with phase(f"tokens/s batch {b}"):
                batch_inputs = bench_inputs(model, b, seed + 2, ragged=ragged)
                for which in ("ours", "stock"):
                    run = gen(which, batch_inputs, throughput_tokens)
                    with peak_memory(device) as record:
                        run()
                    record_memory(f"throughput_batch{b}", which, record)
                    results[f"batch{b}_tokens_per_s_{which}"] = b * throughput_tokens / median_time(run, repeats)
                results[f"batch{b}_tokens_per_s_ratio"] = (
                    results[f"batch{b}_tokens_per_s_ours"] / results[f"batch{b}_tokens_per_s_stock"]
                )
        results["throughput_tokens"] = throughput_tokens
        results["throughput_batches"] = throughput_batches

        if compiled:
            with phase("compiled"):
                results.update(
                    _compiled_runs(
                        gen,
                        inputs,
                        batch_size,
                        new_tokens,
                        throughput_tokens,
                        compile_batches,
                        repeats,
                        seed,
                        ragged,
                        model,
                        device,
                        compile_mode,
                        record_memory,
                    )  # fmt: skip
                )
                best = {
                    which: min(
                        v
                        for v in (
                            results[f"decode_time_per_token_{which}_s"],
                            results.get(f"compiled_decode_time_per_token_{which}_s"),
                        )
                        if v is not None
                    )
                    for which in ("ours", "stock")
                }
                results.update(
                    fastest_decode_time_per_token_ours_s=best["ours"],
                    fastest_decode_time_per_token_stock_s=best["stock"],
                    fastest_decode_time_per_token_ratio=best["ours"] / best["stock"],
                )

        if memory_budget_gb:
            with phase("memory budget"):
                results.update(
                    _memory_budget(
                        gen,
                        model,
                        memory_budget_gb,
                        new_tokens,
                        seed,
                        ragged,
                        cuda,
                        weights,
                        results,
                        batch_size,
                        decode_batch,
                    )  # fmt: skip
                )
    finally:
        phase.close()

    if out:
        write_outputs(results, Path(out))
    return results


def _compiled_runs(
    gen: Callable[..., Callable[[], Any]],
    inputs: dict[str, torch.Tensor],
    batch_size: int,
    new_tokens: int,
    throughput_tokens: int,
    compile_batches: Sequence[int],
    repeats: int,
    seed: int,
    ragged: bool,
    model: DynamicLlavaForConditionalGeneration,
    device: str,
    compile_mode: str | None,
    record_memory: Callable[[str, str, dict], None],
) -> dict[str, Any]:
    """Ours (DynamicLlavaStaticCache) and stock (StaticCache), both compiled by generate(): decode time per token at
    `batch_size` over `new_tokens`, tokens/s at `compile_batches`; compile wall time, graphs and graph breaks."""
    from torch._dynamo.utils import counters

    config = compile_config(device, compile_mode)
    static = dict(cache_implementation="static", compile_config=config)
    results: dict[str, Any] = {"compiled_mode": config.mode, "compiled_errors": {}}
    cuda = torch.device(device).type == "cuda"

    def measured_run(run: Callable[[], Any], name: str, which: str) -> float:
        """The cold run (it compiles for this batch and cache length): its wall time. Memory: on CUDA of the cold
        run (a CUDA-graph pool is allocated there); elsewhere of a further, steady run (compiling takes memory)."""
        with peak_memory(device) if cuda else nullcontext({}) as record:
            _, cold = wall_time(run)
        if not cuda:
            with peak_memory(device) as record:
                run()
        record_memory(name, which, record)
        return cold

    for which in ("ours", "stock"):
        torch._dynamo.reset()
        counters.clear()
        try:
            compile_wall = 0.0
            first = gen(which, inputs, new_tokens, **static)
            cold = measured_run(first, f"compiled_decode_batch{batch_size}", which)
            one = gen(which, inputs, 1, **static)
            one()
            t1, tn = median_time(one, repeats), median_time(first, repeats)
            compile_wall += max(cold - tn, 0.0)
            results[f"compiled_time_to_first_token_{which}_s"] = t1
            results[f"compiled_decode_time_per_token_{which}_s"] = (tn - t1) / (new_tokens - 1)
            for b in compile_batches:
                batch_inputs = bench_inputs(model, b, seed + 2, ragged=ragged)
                run = gen(which, batch_inputs, throughput_tokens, **static)
                cold = measured_run(run, f"compiled_throughput_batch{b}", which)
                steady = median_time(run, repeats)
                compile_wall += max(cold - steady, 0.0)
                results[f"compiled_batch{b}_tokens_per_s_{which}"] = b * throughput_tokens / steady
            results[f"compiled_compile_wall_{which}_s"] = compile_wall
            results[f"compiled_unique_graphs_{which}"] = int(counters["stats"]["unique_graphs"])
            results[f"compiled_graph_breaks_{which}"] = int(sum(counters["graph_break"].values()))
        except Exception as error:  # a model that does not compile here: reported, the rest of the bench goes on
            logger.warning(f"[bench] compiled {which} failed: {error!r}")
            results["compiled_errors"][which] = repr(error)[:2000]
        finally:
            torch._dynamo.reset()
    for key in ("compiled_time_to_first_token", "compiled_decode_time_per_token"):
        if f"{key}_ours_s" in results and f"{key}_stock_s" in results:
            results[f"{key}_ratio"] = results[f"{key}_ours_s"] / results[f"{key}_stock_s"]
    for b in compile_batches:
        key = f"compiled_batch{b}_tokens_per_s"
        if f"{key}_ours" in results and f"{key}_stock" in results:
            results[f"{key}_ratio"] = results[f"{key}_ours"] / results[f"{key}_stock"]
    results["compile_batches"] = list(compile_batches)
    if "compiled_decode_time_per_token_ratio" in results:
        logger.info(
            f"[bench] compiled: time/token ratio {results['compiled_decode_time_per_token_ratio']:.3f} (compile "
            f"{results['compiled_compile_wall_ours_s']:.0f} s ours, {results['compiled_compile_wall_stock_s']:.0f} s "
            "stock)"
        )
    return results


def _memory_budget(
    gen: Callable[..., Callable[[], Any]],
    model: DynamicLlavaForConditionalGeneration,
    budget_gb: float,
    new_tokens: int,
    seed: int,
    ragged: bool,
    cuda: bool,
    weights: dict[str, int],
    results: dict[str, Any],
    batch_size: int,
    decode_batch: int | None,
) -> dict[str, Any]:
    """The largest batch whose footprint with `new_tokens` new tokens fits `budget_gb` GiB, ours and stock."""
    budget = int(budget_gb * GiB)
    out: dict[str, Any] = {"memory_budget_gb": budget_gb, "memory_budget_new_tokens": new_tokens}
    measured = {
        which: {
            b: results["memory"][f"decode_batch{b}"][which]["footprint_bytes"]
            for b in (batch_size, decode_batch)
            if b and f"decode_batch{b}" in results["memory"]
        }
        for which in ("ours", "stock")
    }
    if cuda:
        out["memory_budget_method"] = (
            "measured on CUDA: footprint = own weights + (max_memory_allocated - memory_allocated at the start) of a "
            f"generate with {new_tokens} new tokens; doubling from the linear estimate, then bisection"
        )
        probes = {}
        for which in ("ours", "stock"):

            def footprint(b: int, which: str = which) -> int | None:
                batch_inputs = bench_inputs(model, b, seed + 4, ragged=ragged)
                try:
                    with peak_memory("cuda") as record:
                        gen(which, batch_inputs, new_tokens)()
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    logger.info(f"[bench] memory budget: {which} batch {b} is out of memory")
                    return None
                value = footprint_bytes(record, weights[which])
                logger.info(f"[bench] memory budget: {which} batch {b}: {value / GiB:.2f} GiB")
                return value

            start = estimate_largest_batch({b: v for b, v in measured[which].items() if v}, budget) or 1
            out[f"max_batch_{which}"], probes[which] = search_largest_batch(footprint, budget, start=max(start, 1))
        out["memory_budget_probes"] = probes
    else:
        out["memory_budget_method"] = (
            "estimated on the CPU (no allocator peak): footprint = own weights + peak RSS growth of the decode runs at "
            f"batch {batch_size} and {decode_batch}, a line through the two, solved for the budget"
        )
        for which in ("ours", "stock"):
            points = {b: v for b, v in measured[which].items() if v}
            out[f"max_batch_{which}"] = estimate_largest_batch(points, budget)
        out["memory_budget_probes"] = measured
        if out["max_batch_ours"] is None or out["max_batch_stock"] is None:
            logger.warning(
                "[bench] memory budget: no estimate (the CPU estimate needs the decode runs at two batch sizes: "
                "set decode_batch)"
            )
    if out.get("max_batch_ours") is not None and out.get("max_batch_stock"):
        out["max_batch_ratio"] = out["max_batch_ours"] / out["max_batch_stock"]
    logger.info(
        f"[bench] memory budget {budget_gb} GiB: largest batch ours {out.get('max_batch_ours')}, stock "
        f"{out.get('max_batch_stock')}"
    )
    return out


def platform_summary(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    threads = torch.get_num_threads()
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"CPU {cpu}, {threads} threads (torch {torch.__version__})"


# ---- the table --------------------------------------------------------------------------------------------------


def _flops(value: float) -> str:
    return f"{value / 1e9:.2f} GFLOP"


def _seconds(value: float) -> str:
    return f"{value * 1e3:.1f} ms" if value < 10 else f"{value:.1f} s"


def _bytes(value: float) -> str:
    return f"{value / 2**20:.1f} MiB" if value < GiB else f"{value / GiB:.2f} GiB"


def _rate(value: float) -> str:
    return f"{value:.1f}"


def _count(value: float) -> str:
    return f"{value:.2f}" if value != int(value) else f"{int(value)}"


def _rows(results: dict[str, Any]) -> list[tuple[str, str, str | None, str | None, Callable[[float], str] | None]]:
    """(label, ratio key, floor key, key prefix of the ours/stock values, formatter) for every measure present."""
    r = "(ragged rows)" if results.get("ragged_rows") else ""
    b = results.get("batch_size", 1)
    rows = [
        ("prefill LLM FLOPs", "prefill_llm_flops_ratio", "prefill_llm_flops_floor_ratio", "prefill_llm_flops", _flops),
        ("prefill whole-model FLOPs", "prefill_total_flops_ratio", None, "prefill_total_flops", _flops),
        ("prefill time", "prefill_time_ratio", None, "prefill_time_{}_s", _seconds),
        (f"time to first token, batch {b}", "time_to_first_token_ratio", None, "time_to_first_token_{}_s", _seconds),
        ("KV-cache bytes after N tokens", "kv_bytes_ratio", "kv_bytes_floor_ratio", "kv_bytes", _bytes),
        (
            "decode FLOPs/token, no cache",
            "nocache_decode_flops_ratio",
            "nocache_decode_flops_floor_ratio",
            "nocache_decode_flops",
            _flops,
        ),
        (
            f"decode time/token, batch {b}",
            "decode_time_per_token_ratio",
            None,
            "decode_time_per_token_{}_s",
            _seconds,
        ),
    ]
    batches = sorted(
        {int(k[5:].split("_")[0]) for k in results if k.startswith("batch") and k[5:].split("_")[0].isdigit()}
    )
    for n in batches:
        if n == b:
            continue
        rows += [
            (
                f"time to first token, batch {n} {r}",
                f"batch{n}_time_to_first_token_ratio",
                None,
                f"batch{n}_time_to_first_token_{{}}_s",
                _seconds,
            ),
            (
                f"decode time/token, batch {n} {r}",
                f"batch{n}_decode_time_per_token_ratio",
                None,
                f"batch{n}_decode_time_per_token_{{}}_s",
                _seconds,
            ),
        ]
    for n in batches:
        rows.append(
            (
                f"tokens/s, batch {n} {r if n > 1 else ''}",
                f"batch{n}_tokens_per_s_ratio",
                None,
                f"batch{n}_tokens_per_s_{{}}",
                _rate,
            )
        )
    for n in batches:
        for measure, label in (("aten_ops", "aten ops"), ("host_syncs", "host syncs")):
            key = f"batch{n}_{measure}_per_step"
            rows.append((f"{label}/decode step, batch {n}", f"{key}_ratio", None, f"{key}_{{}}", _count))
    rows += [
        ("overhead, prefill time (sparsity off)", "overhead_prefill_time_ratio", None, None, None),
        ("overhead, decode time (sparsity off)", "overhead_decode_time_ratio", None, None, None),
        (
            f"compiled decode time/token, batch {b}",
            "compiled_decode_time_per_token_ratio",
            None,
            "compiled_decode_time_per_token_{}_s",
            _seconds,
        ),
    ]
    for n in results.get("compile_batches", []):
        rows.append(
            (
                f"compiled tokens/s, batch {n}",
                f"compiled_batch{n}_tokens_per_s_ratio",
                None,
                f"compiled_batch{n}_tokens_per_s_{{}}",
                _rate,
            )
        )
    rows.append(
        (
            "fastest decode time/token (eager or compiled)",
            "fastest_decode_time_per_token_ratio",
            None,
            "fastest_decode_time_per_token_{}_s",
            _seconds,
        )
    )
    for run in results.get("memory", {}):
        label = re.sub(r"batch(\d+)", r"batch \1", run).replace("_", " ")
        rows.append((f"memory footprint, {label}", f"{run}_footprint_ratio", None, run, _bytes))
    if "memory_budget_gb" in results:
        rows.append(
            (
                f"largest batch in {results['memory_budget_gb']} GiB, {results['memory_budget_new_tokens']} new tokens",
                "max_batch_ratio",
                None,
                "max_batch_{}",
                _count,
            )
        )
    return rows


def _values(results: dict[str, Any], key: str | None, fmt: Callable[[float], str] | None) -> tuple[str, str]:
    if key is None or fmt is None:
        return "", ""
    if key in results.get("memory", {}):
        pair = [results["memory"][key].get(which, {}).get("footprint_bytes") for which in ("ours", "stock")]
    elif "{}" in key:
        pair = [results.get(key.format(which)) for which in ("ours", "stock")]
    else:
        pair = [results.get(f"{key}_{which}") for which in ("ours", "stock")]
    return tuple("" if v is None else fmt(v) for v in pair)  # type: ignore[return-value]


def format_table(results: dict[str, Any]) -> str:
    """The measures of `results` as a Markdown table (what `dynamic-llava bench` prints): ours, stock, the ratio
    ours / stock and, where there is one, its floor (only the kept tokens)."""
    lines = ["| measure | ours | stock | ours / stock | floor |", "|---|---|---|---|---|"]
    for label, key, floor, values, fmt in _rows(results):
        if results.get(key) is None:
            continue
        floor_text = f"{results[floor]:.3f}" if floor and results.get(floor) is not None else ""
        ours, stock = _values(results, values, fmt)
        lines.append(f"| {label.strip()} | {ours} | {stock} | {results[key]:.3f} | {floor_text} |")
    lines.append(f"| observed vision keep rate | {results['vision_keep_rate']:.3f} | | | |")
    if results.get("output_text_keep_rate") is not None:
        lines.append(f"| observed output-text keep rate | {results['output_text_keep_rate']:.3f} | | | |")
    for which, error in results.get("compiled_errors", {}).items():
        lines.append(f"| compiled {which} failed | {error.splitlines()[0][:80]} | | | |")
    if "compiled_compile_wall_ours_s" in results or "compiled_compile_wall_stock_s" in results:
        walls = [results.get(f"compiled_compile_wall_{w}_s") for w in ("ours", "stock")]
        text = ["" if w is None else f"{w:.0f} s" for w in walls]
        lines.append(f"| compile wall time ({results.get('compiled_mode')}) | {text[0]} | {text[1]} | | |")
    if results.get("memory_budget_method"):
        lines.append(f"\nlargest batch: {results['memory_budget_method']}")
    return "\n".join(lines)


def write_outputs(results: dict[str, Any], folder: str | os.PathLike) -> None:
    """`results.json` and the two plots (`kv_bytes.png`, `prefill_flops_by_layer.png`, with matplotlib) in `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "results.json", json.dumps(results, indent=2, default=_json_default) + "\n")
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


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
