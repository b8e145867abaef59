"""The measures of the bench, one function each over a `BenchContext`, each returning its flat dict of results
(ours, stock, their ratio ours / stock and, for time ratios, the floor: the ratio if only the kept work were done).

A value a measure cannot compute from the run is an `Unmeasured` (see `bench.context`). Tensor shapes: prompts are
`[batch, prompt]`, images `[batch, 3, side, side]`; P = prompt tokens, P' = tokens kept in the sparse layers after
prefill, L = decoder layers, l = `sparse_layer`, N = new tokens.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from typing import Any

import torch

from .. import sparse_flow
from ..sparse_cache import cache_from_output
from ..training.calibration import calibrate_output_text_bias
from .accounting import cache_bytes, entry_bytes, layer_flops, per_layer_flops
from .bases import bench_base
from .context import WHICH, BenchContext, Unmeasured, per_step_time, ratio, timed
from .counting import per_decode_step
from .memory import estimate_largest_batch, footprint_bytes, peak_memory, search_largest_batch
from .timing import _synchronize, compile_config, median_time, wall_time

__all__ = [
    "calibrate",
    "measure_attention_scorer",
    "measure_compiled",
    "measure_decode",
    "measure_decode_batch",
    "measure_floors",
    "measure_long_generation",
    "measure_mask_builds",
    "measure_memory_budget",
    "measure_nocache_decode",
    "measure_nocache_flops",
    "measure_ops_per_step",
    "measure_prefill_flops",
    "measure_sdpa_masks",
    "measure_prefill_time",
    "measure_throughput",
]

GiB = 2**30
BUDGET_BATCH_LIMIT = {"cpu": 64, "cuda": 512}  # the largest batch a budget probe tries (a CPU probe is slow)
CALIBRATION_TOKENS = (32, 128)  # the output-text calibration scores at least 32 and at most 128 generated tokens


def calibrate(ctx: BenchContext) -> dict[str, Any]:
    """Random weights keep all or nothing: shift the output-text predictor's last bias until the median margin is 0
    (about half kept), on its own prompt and over at least 32 generated tokens (whatever `new_tokens` is)."""
    low, high = CALIBRATION_TOKENS
    tokens = min(high, max(low, ctx.settings.new_tokens))
    rate = calibrate_output_text_bias(
        ctx.model,
        ctx.inputs_at(1, 1),
        max_new_tokens=tokens,
        seed=ctx.settings.seed,
        min_new_tokens=tokens,
        do_sample=True,
        top_k=0,
        **ctx.sparsity,
    )
    return {"calibration_tokens": tokens, "calibration_keep_rate": rate}


# ---- prefill ----------------------------------------------------------------------------------------------------


def measure_prefill_flops(ctx: BenchContext) -> dict[str, Any]:
    """Prefill FLOPs of the LLM part (decoder layers + predictors) and of the whole model, ours vs stock, and their
    floor: stock layers on all P tokens below l and on the P' kept tokens from l on, no predictor."""
    model, stock, inputs = ctx.model, ctx.stock, ctx.inputs
    with torch.no_grad():
        with per_layer_flops(model) as ours:
            out = model(**inputs, logits_to_keep=1, **ctx.sparsity)
        with per_layer_flops(stock) as dense:
            stock(**inputs, logits_to_keep=1)
    cache = cache_from_output(out)
    kept_tokens = int(cache.kept_lengths()[-1].max())
    vision_kept = sum(int(image.numel()) for row in cache.kept_vision_indices for image in row)
    floor = prefill_llm_floor(ctx, dense["layers"][0], kept_tokens)
    return dict(
        prefill_llm_flops_ours=ours["llm"],
        prefill_llm_flops_stock=dense["llm"],
        prefill_llm_flops_ratio=ratio(ours["llm"], dense["llm"]),
        prefill_llm_flops_floor_ratio=ratio(floor, dense["llm"]),
        prefill_total_flops_ours=ours["total"],
        prefill_total_flops_stock=dense["total"],
        prefill_total_flops_ratio=ratio(ours["total"], dense["total"]),
        prefill_total_flops_floor_ratio=ratio(dense["total"] - dense["llm"] + floor, dense["total"]),
        prefill_predictor_flops=ours["predictors"],
        prefill_tokens_in_sparse_layers=kept_tokens,
        vision_keep_rate=vision_kept / image_tokens(ctx),
        prefill_flops_by_layer={"ours": ours["layers"], "stock": dense["layers"]},
    )


def image_tokens(ctx: BenchContext) -> int:
    """Image tokens of the main inputs (all rows), counted in `input_ids` `[batch, prompt]`."""
    return int((ctx.inputs["input_ids"] == ctx.model.config.image_token_id).sum())


def prefill_llm_floor(ctx: BenchContext, dense_layer_flops: int, kept_tokens: int) -> int:
    """The prefill LLM FLOPs of only the kept work: `batch` rows of stock layers on all P tokens below l
    (`dense_layer_flops`, one stock layer's), on the `kept_tokens` kept ones (P') from l on, no predictor."""
    text, batch = ctx.model.config.text_config, ctx.settings.batch_size
    layers, sparse_layer = text.num_hidden_layers, ctx.model.config.sparse_layer
    return batch * (sparse_layer * dense_layer_flops + (layers - sparse_layer) * layer_flops(ctx.stock, kept_tokens))


def measure_attention_scorer(ctx: BenchContext, results: dict[str, Any]) -> dict[str, Any]:
    """
    The training-free attention scorer (FastV's rule, `image_scorer="attention"` per call, the same keep budget)
    beside the predictor: prefill LLM FLOPs (its recomputed attention of layer l - 1 included) and their floor (the
    kept tokens), prefill time (a forward, one untimed warm-up, the median over `repeats`), each against the stock
    values of this run (`measure_prefill_flops`, `measure_prefill_time`).
    """
    request = {**ctx.sparsity, "image_scorer": "attention"}
    try:
        ctx.model.config.sparsity_settings(**request)
    except ValueError as error:
        missing = Unmeasured(f"the attention scorer cannot run with this sparsity: {error}")
        return {f"attention_scorer_{key}": missing for key in ("prefill_llm_flops_ratio", "prefill_time_ratio")}

    def prefill() -> Any:
        with torch.no_grad():
            return ctx.model(**ctx.inputs, logits_to_keep=1, **request)

    with torch.no_grad(), per_layer_flops(ctx.model) as counted:
        out = prefill()
    kept_tokens = int(cache_from_output(out).kept_lengths()[-1].max())
    del out
    stock_flops = results["prefill_llm_flops_stock"]
    floor = prefill_llm_floor(ctx, results["prefill_flops_by_layer"]["stock"][0], kept_tokens)
    prefill()  # warm-up
    seconds = timed(median_time(prefill, ctx.settings.repeats))
    stock_time = results.get("prefill_time_stock_s")
    if stock_time is None:
        stock_time = Unmeasured(results["missing"].get("prefill_time_stock_s", "no stock prefill time"))
    return dict(
        attention_scorer_prefill_llm_flops_ours=counted["llm"],
        attention_scorer_prefill_llm_flops_stock=stock_flops,
        attention_scorer_flops=counted["scorers"],
        attention_scorer_prefill_llm_flops_ratio=ratio(counted["llm"], stock_flops),
        attention_scorer_prefill_llm_flops_floor_ratio=ratio(floor, stock_flops),
        attention_scorer_prefill_tokens_in_sparse_layers=kept_tokens,
        attention_scorer_prefill_time_ours_s=seconds,
        attention_scorer_prefill_time_stock_s=stock_time,
        attention_scorer_prefill_time_ratio=ratio(seconds, stock_time),
    )


def measure_prefill_time(ctx: BenchContext) -> dict[str, Any]:
    """Prefill time (one forward), time to first token (a whole generate of one token), and the overhead of ours
    with sparsity off (`SPARSITY_OFF`), each after one untimed warm-up, medians over `repeats`; and the measured
    floor: stock's forward on prompts as long as what ours keeps (`kept_length_prompts`: text only, so neither the
    vision tower nor the dense layers' full prompt is in it)."""
    repeats = ctx.settings.repeats

    def prefill(which: str) -> Callable[[], Any]:
        def run() -> None:
            with torch.no_grad():
                ctx.model_of(which)(**ctx.inputs, logits_to_keep=1, **ctx.kwargs_of(which))

        return run

    sides = ("ours", "stock", "off")
    for which in sides:
        prefill(which)()
    forward = {which: timed(median_time(prefill(which), repeats)) for which in sides}
    first = {which: ctx.gen(which, ctx.inputs, 1) for which in sides}
    for fn in first.values():
        fn()
    ttft = {which: timed(median_time(fn, repeats)) for which, fn in first.items()}
    kept = main_kept_length_prompts(ctx)

    def floor_prefill() -> None:
        with torch.no_grad():
            ctx.stock(**kept, logits_to_keep=1)

    floor_prefill()
    floor = timed(median_time(floor_prefill, repeats))
    parts = {
        "ours": prefill_parts(ctx.model, prefill("ours"), repeats, ctx.model.config.sparse_layer),
        "stock": prefill_parts(ctx.stock, prefill("stock"), repeats, ctx.model.config.sparse_layer),
        "floor": prefill_parts(ctx.stock, floor_prefill, repeats, ctx.model.config.sparse_layer),
    }
    return dict(
        **prefill_parts_results(ctx, parts, forward["ours"]),
        prefill_time_measured_floor_s=floor,
        prefill_time_vs_floor_ratio=ratio(forward["ours"], floor),
        prefill_time_ours_s=forward["ours"],
        prefill_time_stock_s=forward["stock"],
        prefill_time_ratio=ratio(forward["ours"], forward["stock"]),
        overhead_prefill_time_ratio=ratio(forward["off"], forward["stock"]),
        time_to_first_token_ours_s=ttft["ours"],
        time_to_first_token_stock_s=ttft["stock"],
        time_to_first_token_off_s=ttft["off"],
        time_to_first_token_ratio=ratio(ttft["ours"], ttft["stock"]),
    )


# ---- decoding with a cache --------------------------------------------------------------------------------------


PREFILL_PARTS = ("vision", "dense_layers", "predictors", "sparse_layers", "head", "rest")


def prefill_parts(
    model: torch.nn.Module, forward: Callable[[], Any], repeats: int, sparse_layer: int
) -> dict[str, float]:
    """
    Seconds per part of one prefill `forward()` of `model` (ours or stock, layers split at `sparse_layer`),
    medians over `repeats` hooked runs (each part's hooks wait for CUDA work, so the parts add up to a slightly
    slower forward than the unhooked one): `vision` (the inner model's children other than the language model and
    the predictors: vision tower, projector), `dense_layers` (decoder layers below `sparse_layer`), `predictors`,
    `sparse_layers` (the decoder layers from `sparse_layer` on), `head` (the LM head), `rest` (the forward less all
    of these: embedding, merging, selection, masks, the final norm). A part the forward does not run (stock's
    predictors, the vision tower of a prompt without an image) is left out.
    """
    inner = model.model
    layers = inner.language_model.layers
    groups: dict[str, list[torch.nn.Module]] = {
        "vision": [m for n, m in inner.named_children() if n != "language_model" and "predictor" not in n],
        "dense_layers": list(layers[:sparse_layer]),
        "predictors": [m for n, m in inner.named_children() if "predictor" in n],
        "sparse_layers": list(layers[sparse_layer:]),
        "head": [model.lm_head],
    }
    spent = dict.fromkeys(groups, 0.0)
    calls = dict.fromkeys(groups, 0)
    began: dict[int, float] = {}
    handles = []
    for part, modules in groups.items():
        for module in modules:

            def pre(mod: Any, args: Any) -> None:
                _synchronize()
                began[id(mod)] = time.perf_counter()

            def post(mod: Any, args: Any, output: Any, part: str = part) -> None:
                _synchronize()
                spent[part] += time.perf_counter() - began[id(mod)]
                calls[part] += 1

            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    runs = []
    try:
        for _ in range(max(repeats, 1)):
            for part in spent:
                spent[part] = 0.0
            _, total = wall_time(forward)
            runs.append({**spent, "rest": total - sum(spent.values())})
    finally:
        for handle in handles:
            handle.remove()
    ran = [part for part in PREFILL_PARTS if part == "rest" or calls[part]]  # (stock has no predictor, no image
    return {part: sorted(run[part] for run in runs)[len(runs) // 2] for part in ran}  # reaches the floor's tower)


def prefill_parts_results(ctx: BenchContext, parts: dict[str, dict[str, float]], ours_s: Any) -> dict[str, Any]:
    """Keys `prefill_part_{part}_{side}_s` (`PREFILL_PARTS`; sides ours, stock and floor: stock on the kept-length
    prompts) and their ratios, and the parts floor: stock's vision, dense layers and head at the full prompt plus
    its later layers on the kept length (all a prefill that prunes at `sparse_layer` must spend), with ours over it
    (`prefill_time_vs_parts_floor_ratio`)."""
    results: dict[str, Any] = {}
    for part in PREFILL_PARTS:
        for side, values in parts.items():
            if part in values:  # (the parts a side runs: `prefill_parts`)
                results[f"prefill_part_{part}_{side}_s"] = timed(values[part])
        if part in parts["ours"] and part in parts["stock"]:
            results[f"prefill_part_{part}_ratio"] = ratio(
                results[f"prefill_part_{part}_ours_s"], results[f"prefill_part_{part}_stock_s"]
            )
    stock = parts["stock"]
    floor = stock.get("vision", 0.0) + stock["dense_layers"] + stock["head"] + parts["floor"]["sparse_layers"]
    results["prefill_time_parts_floor_s"] = timed(floor)
    results["prefill_time_vs_parts_floor_ratio"] = ratio(ours_s, timed(floor))
    return results


@contextlib.contextmanager
def tracked_forwards(model: torch.nn.Module) -> Iterator[dict[str, list]]:
    """Per forward of `model` (the prefill, then one per decode step): the cache bytes after it and the wall clock
    when it returned (CUDA work waited for). Yields `{"bytes": [...], "entry_bytes": [...], "clock": [...]}`, filled
    as it runs (`bytes`: the cache's storage; `entry_bytes`: its kept entries, `accounting.entry_bytes`)."""
    track: dict[str, list] = {"bytes": [], "entry_bytes": [], "clock": []}

    def hook(module: torch.nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        _synchronize()
        track["clock"].append(time.perf_counter())
        cache = cache_from_output(output)
        track["bytes"].append(cache_bytes(cache))
        track["entry_bytes"].append(entry_bytes(cache))

    handle = model.register_forward_hook(hook, with_kwargs=True)
    try:
        yield track
    finally:
        handle.remove()


def output_text_keep(cache: Any) -> tuple[float | Unmeasured, int]:
    """The share of generated tokens the output-text predictor kept in `cache`, and how many it scored (the last
    generated token is never scored: it is not fed back)."""
    decisions = torch.cat(cache.output_text_keep) if cache.output_text_keep else torch.zeros(0)
    if not decisions.numel():
        return Unmeasured("no generated token was scored (the first is scored at the first decode step)"), 0
    return float(decisions.float().mean()), int(decisions.numel())


def measure_decode(ctx: BenchContext, first_token_s: dict[str, Any]) -> dict[str, Any]:
    """
    `generate(N)` at the main batch: KV-cache bytes after it (ours' `stored_bytes()` vs the stock cache; floor: the
    kept entries only, l * P + (L - l) * P' + kept generated, per row), the bytes after every token, the memory of the
    run, the observed output-text keep rate, and decode time per token = (generate(N) - generate(1)) / (N - 1).

    `first_token_s`: time to first token per side ("ours", "stock", "off"), from `measure_prefill_time`.
    """
    settings, n = ctx.settings, ctx.settings.new_tokens
    results: dict[str, Any] = {"memory": {}}
    curve, generated = {}, {}
    for which in WHICH:
        with tracked_forwards(ctx.model_of(which)) as track, peak_memory(ctx.device) as record:
            generated[which] = ctx.gen(which, ctx.inputs, n)()
        curve[which] = track["bytes"]
        ctx.record_memory(results["memory"], f"decode_batch{settings.batch_size}", which, record)
    ours_cache = cache_from_output(generated["ours"])
    keep_rate, scored = output_text_keep(ours_cache)
    layers = ctx.model.config.text_config.num_hidden_layers
    dense_entries = layers * settings.batch_size * (ctx.prompt_tokens + n - 1)
    memory = results["memory"][f"decode_batch{settings.batch_size}"]
    results.update(
        output_text_keep_rate=keep_rate,
        output_text_scored_tokens=scored,
        kv_bytes_ours=ours_cache.stored_bytes(),
        kv_bytes_allocated_ours=ours_cache.allocated_bytes(),
        kv_bytes_stock=cache_bytes(cache_from_output(generated["stock"])),
        kv_bytes_floor_ratio=int(ours_cache.kept_lengths().sum()) / dense_entries,
        kv_bytes_curve=curve,
        peak_rss_ours_bytes=memory["ours"]["peak_rss_bytes"],
        peak_rss_stock_bytes=memory["stock"]["peak_rss_bytes"],
    )
    if ctx.cuda:
        results.update(
            peak_cuda_ours_bytes=memory["ours"]["cuda_peak_bytes"],
            peak_cuda_stock_bytes=memory["stock"]["cuda_peak_bytes"],
        )
    results["kv_bytes_ratio"] = ratio(results["kv_bytes_ours"], results["kv_bytes_stock"])
    ctx.artifacts["sequence"] = generated["ours"].sequences[:1]  # `[1, prompt + N]`, for the no-cache FLOPs
    del generated, ours_cache
    runs = {which: ctx.gen(which, ctx.inputs, n) for which in ("ours", "stock", "off")}
    runs["off"]()  # warm-up (ours and stock are warm from the runs above)
    per_token = {}
    for which, fn in runs.items():
        first = first_token_s[which]
        total = median_time(fn, settings.repeats)
        per_token[which] = first if isinstance(first, Unmeasured) else per_step_time(total, first, n - 1)
    results.update(
        decode_time_per_token_ours_s=per_token["ours"],
        decode_time_per_token_stock_s=per_token["stock"],
        decode_time_per_token_ratio=ratio(per_token["ours"], per_token["stock"]),
        overhead_decode_time_ratio=ratio(per_token["off"], per_token["stock"]),
    )
    return results


def measure_decode_batch(ctx: BenchContext) -> dict[str, Any]:
    """A second decode run over N tokens at `decode_batch` rows (ragged): time to first token, decode time per token,
    the memory of the run."""
    batch, n, repeats = ctx.settings.decode_batch, ctx.settings.new_tokens, ctx.settings.repeats
    inputs = ctx.inputs_at(batch, 3)
    key = f"batch{batch}"
    results: dict[str, Any] = {"memory": {}}
    for which in WHICH:
        with peak_memory(ctx.device) as record:
            ctx.gen(which, inputs, n)()  # warm-up, and the memory of this run
        ctx.record_memory(results["memory"], f"decode_batch{batch}", which, record)
        one = ctx.gen(which, inputs, 1)
        one()
        first = timed(median_time(one, repeats))
        total = median_time(ctx.gen(which, inputs, n), repeats)
        results[f"{key}_time_to_first_token_{which}_s"] = first
        results[f"{key}_decode_time_per_token_{which}_s"] = (
            first if isinstance(first, Unmeasured) else per_step_time(total, first, n - 1)
        )
    for measure in ("time_to_first_token", "decode_time_per_token"):
        results[f"{key}_{measure}_ratio"] = ratio(
            results[f"{key}_{measure}_ours_s"], results[f"{key}_{measure}_stock_s"]
        )
    return results


def measure_ops_per_step(ctx: BenchContext) -> dict[str, Any]:
    """Dispatched aten ops and host syncs per decode step, (generate(1 + S) - generate(1)) / S, at the main batch
    and at `decode_batch`."""
    settings = ctx.settings
    results: dict[str, Any] = {"count_steps": settings.count_steps}
    for b in sorted({settings.batch_size, settings.decode_batch or settings.batch_size}):
        inputs = ctx.inputs_at(b, 3)
        counts = {
            which: per_decode_step(
                ctx.model_of(which),
                inputs,
                settings.count_steps,
                do_sample=True,
                top_k=0,
                seed=settings.seed,
                **ctx.kwargs_of(which),
            )
            for which in WHICH
        }
        for which, count in counts.items():
            results[f"batch{b}_aten_ops_per_step_{which}"] = count["ops"]
            results[f"batch{b}_host_syncs_per_step_{which}"] = count["syncs"]
        results[f"batch{b}_aten_ops_per_step_ratio"] = ratio(counts["ours"]["ops"], counts["stock"]["ops"])
        results[f"batch{b}_host_syncs_per_step_extra"] = counts["ours"]["syncs"] - counts["stock"]["syncs"]
        if counts["stock"]["syncs"]:
            results[f"batch{b}_host_syncs_per_step_ratio"] = counts["ours"]["syncs"] / counts["stock"]["syncs"]
    return results


@contextlib.contextmanager
def counted_mask_builds(stock_text_model: torch.nn.Module) -> Iterator[dict[str, int]]:
    """Count the attention masks built: ours' `sparse_masks.attention_mask_for` (as `sparse_flow` calls it; each
    call is one additive float mask `[batch, 1, q, keys]`) and the `create_causal_mask` calls of the stock text
    model's module (`stock_text_model`: its Llama / Qwen2.5-VL decoder) that return a mask (one per forward). Yields
    `{"ours": n, "stock": n}`, counted as it runs."""
    modeling_stock = sys.modules[type(stock_text_model).__module__]

    counts = {"ours": 0, "stock": 0}
    ours_builder, stock_builder = sparse_flow.attention_mask_for, modeling_stock.create_causal_mask

    def ours(*args: Any, **kwargs: Any) -> torch.Tensor:
        counts["ours"] += 1
        return ours_builder(*args, **kwargs)

    def stock(*args: Any, **kwargs: Any) -> Any:
        mask = stock_builder(*args, **kwargs)
        counts["stock"] += mask is not None
        return mask

    sparse_flow.attention_mask_for, modeling_stock.create_causal_mask = ours, stock
    try:
        yield counts
    finally:
        sparse_flow.attention_mask_for, modeling_stock.create_causal_mask = ours_builder, stock_builder


SDPA_KERNELS = ("flash", "efficient", "cudnn", "math", "overrideable", "unknown")


def sdpa_kernel(query: Any, key: Any, value: Any, attn_mask: Any, dropout_p: float, is_causal: bool, **kw: Any) -> str:
    """The kernel `scaled_dot_product_attention` dispatches these arguments to (`torch._fused_sdp_choice`, the
    function it asks itself): `flash`, `efficient`, `cudnn`, `math` or `overrideable`; `unknown` where this torch
    has no such function."""
    chooser = getattr(torch, "_fused_sdp_choice", None)
    if chooser is None:
        return "unknown"
    scale, enable_gqa = kw.get("scale"), kw.get("enable_gqa", False)
    choice = chooser(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
    name = torch.nn.attention.SDPBackend(choice).name.lower()
    return {"flash_attention": "flash", "efficient_attention": "efficient", "cudnn_attention": "cudnn"}.get(name, name)


@contextlib.contextmanager
def counted_sdpa_masks() -> Iterator[dict[str, int]]:
    """Count `torch.nn.functional.scaled_dot_product_attention` calls by the mask they pass: `float` (additive),
    `bool`, `none` (causal or no mask); and by the kernel each call dispatches to (`sdpa_kernel`, keys
    `kernel_<name>`). On CUDA, flash takes no mask and the memory-efficient kernel takes either kind; on a CPU the
    flash kernel takes every mask. transformers' sdpa attention, which our sparse layers use too, looks the function
    up at each call."""
    counts = {"float": 0, "bool": 0, "none": 0, **{f"kernel_{name}": 0 for name in SDPA_KERNELS}}
    original = torch.nn.functional.scaled_dot_product_attention

    def counting(query: Any, key: Any, value: Any, attn_mask: Any = None, *args: Any, **kwargs: Any) -> Any:
        kind = "none" if attn_mask is None else "bool" if attn_mask.dtype == torch.bool else "float"
        counts[kind] += 1
        dropout_p = args[0] if args else kwargs.get("dropout_p", 0.0)
        is_causal = args[1] if len(args) > 1 else kwargs.get("is_causal", False)
        extra = {name: kwargs[name] for name in ("scale", "enable_gqa") if name in kwargs}
        counts[f"kernel_{sdpa_kernel(query, key, value, attn_mask, dropout_p, is_causal, **extra)}"] += 1
        return original(query, key, value, attn_mask, *args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = counting
    try:
        yield counts
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def measure_sdpa_masks(ctx: BenchContext) -> dict[str, Any]:
    """SDPA calls per decode step by mask kind and by kernel (`counted_sdpa_masks`), (generate(1 + S) -
    generate(1)) / S, at batch 1 and at the decode batch (ragged if set). Keys `batch{b}_sdpa_{kind}_masks_per_step_
    {side}` and `batch{b}_sdpa_kernel_{name}_per_step_{side}` (kernels no call took are left out)."""
    steps = max(ctx.settings.count_steps, 1)
    results: dict[str, Any] = {}
    for b in sorted({1, ctx.settings.decode_batch or 1}):
        inputs = ctx.inputs_at(b, 3)
        for which in WHICH:
            seen = []
            for n in (1, 1 + steps):
                with counted_sdpa_masks() as counts:
                    ctx.gen(which, inputs, n)()
                seen.append(dict(counts))
            for kind in seen[1]:
                per_step = (seen[1][kind] - seen[0][kind]) / steps
                if kind.startswith("kernel_"):
                    if seen[1][kind]:
                        results[f"batch{b}_sdpa_{kind}_per_step_{which}"] = per_step
                else:
                    results[f"batch{b}_sdpa_{kind}_masks_per_step_{which}"] = per_step
    return results


def measure_mask_builds(ctx: BenchContext) -> dict[str, Any]:
    """Attention masks built per decode step, (generate(1 + S) - generate(1)) / S: one shared by all the layers it
    serves, not one per layer (`num_layers` per step would be a rebuild in every layer)."""
    steps = max(ctx.settings.count_steps, 1)
    per_step = {}
    for which in WHICH:
        built = []
        for n in (1, 1 + steps):
            with counted_mask_builds(ctx.stock.model.language_model) as counts:
                ctx.gen(which, ctx.inputs, n)()
            built.append(counts[which])
        per_step[which] = (built[1] - built[0]) / steps
    return dict(
        masks_per_step_ours=per_step["ours"],
        masks_per_step_stock=per_step["stock"],
        masks_per_step_layers=ctx.model.config.text_config.num_hidden_layers,
        masks_per_step_method=(
            "ours: calls of sparse_masks.attention_mask_for (float masks); stock: create_causal_mask calls that "
            f"return a mask; per decode step over {steps} steps"
        ),
    )


def measure_throughput(ctx: BenchContext) -> dict[str, Any]:
    """Tokens/s = batch * T / time of generate(T) at each of `throughput_batches` (T = `throughput_tokens`), with
    the memory of each run."""
    tokens = ctx.settings.throughput_tokens
    results: dict[str, Any] = {"memory": {}, "throughput_tokens": tokens}
    for b in ctx.settings.throughput_batches:
        inputs = ctx.inputs_at(b, 2)
        for which in WHICH:
            run = ctx.gen(which, inputs, tokens)
            with peak_memory(ctx.device) as record:
                run()
            ctx.record_memory(results["memory"], f"throughput_batch{b}", which, record)
            seconds = timed(median_time(run, ctx.settings.repeats))
            results[f"batch{b}_tokens_per_s_{which}"] = (
                seconds if isinstance(seconds, Unmeasured) else b * tokens / seconds
            )
        results[f"batch{b}_tokens_per_s_ratio"] = ratio(
            results[f"batch{b}_tokens_per_s_ours"], results[f"batch{b}_tokens_per_s_stock"]
        )
    results["throughput_batches"] = list(ctx.settings.throughput_batches)
    return results


# ---- the floors of the time ratios ------------------------------------------------------------------------------


def decode_step_flops(ctx: BenchContext, dense_keys: int, sparse_keys: int) -> tuple[int, int]:
    """(kept-work, stock) FLOPs of one decode step of one row: stock layers on one query over `dense_keys` keys
    below l and over `sparse_keys` kept keys from l on (no predictor), vs all L layers over `dense_keys`; both with
    the LM head (2 * hidden * vocab)."""
    text = ctx.model.config.text_config
    layers, sparse_layer = text.num_hidden_layers, ctx.model.config.sparse_layer
    head = 2 * text.hidden_size * text.vocab_size
    full = layer_flops(ctx.stock, 1, keys=dense_keys)
    kept = layer_flops(ctx.stock, 1, keys=sparse_keys)
    return sparse_layer * full + (layers - sparse_layer) * kept + head, layers * full + head


def floor_keep_rate(ctx: BenchContext, results: dict[str, Any]) -> float | Unmeasured:
    """The output-text keep rate the floors assume: the observed one (1 with the predictor off)."""
    if not ctx.model.config.sparsity_settings(**ctx.sparsity).use_output_text_predictor:
        return 1.0
    rate = results.get("output_text_keep_rate")
    if rate is None:
        return Unmeasured(results.get("missing", {}).get("output_text_keep_rate", "no output-text keep rate"))
    return rate


def generation_floor(ctx: BenchContext, results: dict[str, Any], steps: int) -> float | Unmeasured:
    """The kept-work / stock FLOP ratio of a generate with `steps` decode steps after the prefill (one row): the
    prefill at its whole-model floor, each step at the keys of the middle step (P + steps/2 dense, P' + r * steps/2
    kept, r = `floor_keep_rate`)."""
    if steps == 0:
        return results["prefill_total_flops_floor_ratio"]
    rate = floor_keep_rate(ctx, results)
    if isinstance(rate, Unmeasured):
        return rate
    prefill_stock = results["prefill_total_flops_stock"] / ctx.settings.batch_size
    prefill_floor = prefill_stock * results["prefill_total_flops_floor_ratio"]
    kept = results["prefill_tokens_in_sparse_layers"] + int(rate * steps / 2)
    floor, dense = decode_step_flops(ctx, ctx.prompt_tokens + steps // 2, kept)
    return (prefill_floor + steps * floor) / (prefill_stock + steps * dense)


def measure_floors(ctx: BenchContext, results: dict[str, Any]) -> dict[str, Any]:
    """The floor of every time ratio: the ratio if only the kept work were done (FLOPs of the kept tokens, as the
    FLOP floors count them). Prefill and time to first token: the whole-model prefill floor; decode time per token:
    one step at the middle of N; tokens/s (higher is better): stock work / kept work of generate(T)."""
    n, tokens = ctx.settings.new_tokens, ctx.settings.throughput_tokens
    rate = floor_keep_rate(ctx, results)
    if n < 2:
        step: float | Unmeasured = Unmeasured("1 new token: no decode step")
    elif isinstance(rate, Unmeasured):
        step = rate
    else:
        kept = results["prefill_tokens_in_sparse_layers"] + int(rate * n / 2)
        floor, dense = decode_step_flops(ctx, ctx.prompt_tokens + n // 2, kept)
        step = floor / dense
    whole = generation_floor(ctx, results, max(tokens - 1, 0))
    return dict(
        prefill_time_floor_ratio=results["prefill_total_flops_floor_ratio"],
        decode_time_floor_ratio=step,
        tokens_per_s_floor_ratio=whole if isinstance(whole, Unmeasured) else 1 / whole,
    )


# ---- decoding without a cache -----------------------------------------------------------------------------------


def measure_nocache_flops(ctx: BenchContext) -> dict[str, Any]:
    """FLOPs of the next token after N generated ones without a cache (the whole `[1, P + N]` sequence again), and
    their floor: stock layers on all tokens below l, on the kept ones from l on."""
    model, stock = ctx.model, ctx.stock
    sequence, n = ctx.artifacts["sequence"], ctx.settings.new_tokens
    real = ctx.inputs["attention_mask"][0].bool()
    sequence = sequence[:, torch.cat([real, torch.ones(n, dtype=torch.bool, device=real.device)])]
    adapter = bench_base(model.config)
    images = {**adapter.first_rows(ctx.inputs, 1), **adapter.token_inputs(model.config, sequence)}
    with torch.no_grad():
        with per_layer_flops(model) as ours:
            out = model(
                input_ids=sequence,
                **images,
                use_cache=False,
                output_text_start=int(real.sum()),
                logits_to_keep=1,
                **ctx.sparsity,
            )
        with per_layer_flops(stock) as dense:
            stock(input_ids=sequence, **images, use_cache=False, logits_to_keep=1)
    total = sequence.shape[1]
    kept = int((out.token_indices[0] >= 0).sum()) if out.token_indices is not None else total
    layers, sparse_layer = model.config.text_config.num_hidden_layers, model.config.sparse_layer
    floor = sparse_layer * layer_flops(stock, total) + (layers - sparse_layer) * layer_flops(stock, kept)
    return dict(
        nocache_decode_flops_ours=ours["llm"],
        nocache_decode_flops_stock=dense["llm"],
        nocache_decode_flops_ratio=ratio(ours["llm"], dense["llm"]),
        nocache_decode_flops_floor_ratio=ratio(floor, dense["llm"]),
    )


def measure_nocache_decode(ctx: BenchContext) -> dict[str, Any]:
    """Decode time per token with `use_cache=False` (each step runs the whole sequence again): (generate(K) -
    generate(1)) / (K - 1), K = `nocache_tokens`, at the main batch; and the same for stock from prompts as long as
    what ours keeps (the measured floor)."""
    n, repeats = ctx.settings.nocache_tokens, ctx.settings.repeats
    kept = main_kept_length_prompts(ctx)
    per_token = {}
    for which in (*WHICH, "floor"):
        side, inputs = ("stock", kept) if which == "floor" else (which, ctx.inputs)
        one, many = (ctx.gen(side, inputs, k, use_cache=False) for k in (1, n))
        one()
        first = median_time(one, repeats)
        per_token[which] = per_step_time(median_time(many, repeats), first, n - 1)
    return dict(
        nocache_decode_time_per_token_floor_s=per_token["floor"],
        nocache_decode_time_vs_floor_ratio=ratio(per_token["ours"], per_token["floor"]),
        nocache_tokens=n,
        nocache_decode_time_per_token_ours_s=per_token["ours"],
        nocache_decode_time_per_token_stock_s=per_token["stock"],
        nocache_decode_time_per_token_ratio=ratio(per_token["ours"], per_token["stock"]),
    )


# ---- long generations -------------------------------------------------------------------------------------------


def kept_length_prompts(ctx: BenchContext, inputs: dict[str, torch.Tensor], cache: Any) -> dict[str, torch.Tensor]:
    """
    The floor's prompts: per row of `inputs`, random text ids as many as that row's tokens in our sparse layers after
    the prefill (its text plus the image tokens it kept), left padded, no image. Returns `input_ids` and
    `attention_mask` `[batch, longest kept]`: stock decoding from them does only the work ours keeps.
    """
    mask = inputs["attention_mask"]
    image_id = ctx.model.config.image_token_id
    lengths = [
        int(mask[row].sum()) - int((inputs["input_ids"][row] == image_id).sum()) + sum(int(k.numel()) for k in kept)
        for row, kept in enumerate(cache.kept_vision_indices)
    ]
    generator = torch.Generator().manual_seed(ctx.settings.seed + 11)
    width = max(lengths)
    vocab = min(image_id, ctx.model.config.get_text_config(decoder=True).vocab_size)
    input_ids = torch.zeros(len(lengths), width, dtype=torch.long)
    attention_mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        input_ids[row, width - n :] = torch.randint(3, vocab, (n,), generator=generator)
        attention_mask[row, width - n :] = 1
    return {"input_ids": input_ids.to(ctx.model.device), "attention_mask": attention_mask.to(ctx.model.device)}


def main_kept_length_prompts(ctx: BenchContext) -> dict[str, torch.Tensor]:
    """`kept_length_prompts` of the main inputs (one generate of ours, once per run: prefill and no-cache share it)."""
    if "kept_prompts" not in ctx.artifacts:
        cache = cache_from_output(ctx.gen("ours", ctx.inputs, 1)())
        ctx.artifacts["kept_prompts"] = kept_length_prompts(ctx, ctx.inputs, cache)
    return ctx.artifacts["kept_prompts"]


def step_times(clock: list[float], window: int = 32) -> list[float]:
    """Seconds per decode step, averaged over consecutive windows of `window` steps (`clock[i]`: after forward i)."""
    return [(clock[k + window] - clock[k]) / window for k in range(0, len(clock) - window, window)]


def times_at(track: dict[str, list], k: int) -> float | Unmeasured:
    """Decode time per token over the first `k` tokens of a `tracked_forwards` track (the prefill left out)."""
    return per_step_time(track["clock"][k - 1], track["clock"][0], k - 1)


def no_context_step_time(ctx: BenchContext, batch: int, steps: int) -> float | Unmeasured:
    """Stock's decode time per token at `batch` rows from a one-token prompt over `steps` tokens: the weights, the
    head and sampling with (almost) no keys to attend to, the time no pruning of the context can go below."""
    inputs = {
        "input_ids": torch.full((batch, 1), 3, dtype=torch.long, device=ctx.model.device),
        "attention_mask": torch.ones(batch, 1, dtype=torch.long, device=ctx.model.device),
    }
    ctx.gen("stock", inputs, 2)()  # warm-up
    with tracked_forwards(ctx.stock) as track:
        ctx.gen("stock", inputs, steps)()
    return times_at(track, steps)


def long_generation_at(ctx: BenchContext, batch: int, lengths: list[int]) -> dict[str, Any]:
    """
    One generate of max(`lengths`) tokens per side at `batch` rows (ragged if set), each forward timed and its
    cache measured, and the floor: stock from prompts as long as what ours keeps (`kept_length_prompts`). At each
    length K: decode time per token over the first K tokens ((clock after forward K - clock after the prefill) /
    (K - 1)), ours / stock and ours / floor, and stock's with no context over stock's (`no_context_step_time`: the
    lowest time ratio any pruning of the context can reach); cache bytes after K tokens, ours / stock (and ours'
    kept entries without row padding, `accounting.entry_bytes`, over stock's), with the FLOP-counted floors
    (time: a step at K/2 on the kept keys; bytes: l * (P + K) + (L - l) * (P' + r * K), over L * (P + K)). One run
    each (no median). Keys: `long{K}_...` at batch 1, `long{K}_b{batch}_...` otherwise.
    """
    longest = lengths[-1]
    inputs = ctx.inputs_at(batch, 5)
    prompt = int(round(inputs["attention_mask"].double().sum(-1).mean().item()))  # the rows' mean real prompt
    tag = "" if batch == 1 else f"_b{batch}"
    results: dict[str, Any] = {"memory": {}}
    tracks, kept, floor_inputs = {}, None, None
    for which in (*WHICH, "floor"):
        side = "stock" if which == "floor" else which
        run_inputs = floor_inputs if which == "floor" else inputs
        ctx.gen(side, run_inputs, 2)()  # warm-up
        with tracked_forwards(ctx.model_of(side)) as track, peak_memory(ctx.device) as record:
            out = ctx.gen(side, run_inputs, longest)()
        tracks[which] = track
        if which != "floor":
            ctx.record_memory(results["memory"], f"long_generation_{longest}{tag}", which, record)
        if which == "ours":
            cache = cache_from_output(out)
            keep_rate, _ = output_text_keep(cache)
            rate = 0 if isinstance(keep_rate, Unmeasured) else keep_rate
            # the rows' mean kept prompt entries in the sparse layers (their kept entries less the generated ones)
            kept_rows = cache.kept_lengths()[-1].double().mean().item()
            kept = (int(round(kept_rows - (longest - 1) * rate)), keep_rate)
            floor_inputs = kept_length_prompts(ctx, inputs, cache)
        del out
    no_context = no_context_step_time(ctx, batch, min(longest, 64))
    text = ctx.model.config.text_config
    layers, sparse_layer = text.num_hidden_layers, ctx.model.config.sparse_layer
    for k in lengths:
        times = {w: times_at(tracks[w], k) for w in tracks}
        results[f"long{k}{tag}_decode_time_no_context_ratio"] = ratio(no_context, times["stock"])
        for which in WHICH:
            results[f"long{k}{tag}_decode_time_per_token_{which}_s"] = times[which]
            results[f"long{k}{tag}_cache_bytes_{which}"] = tracks[which]["bytes"][k - 1]
        results[f"long{k}{tag}_decode_time_per_token_floor_s"] = times["floor"]
        results[f"long{k}{tag}_decode_time_per_token_ratio"] = ratio(times["ours"], times["stock"])
        results[f"long{k}{tag}_decode_time_vs_floor_ratio"] = ratio(times["ours"], times["floor"])
        results[f"long{k}{tag}_cache_bytes_ratio"] = ratio(
            results[f"long{k}{tag}_cache_bytes_ours"], results[f"long{k}{tag}_cache_bytes_stock"]
        )
        # ours' kept entries row by row (no padding to the longest kept row) against stock's storage
        results[f"long{k}{tag}_cache_entry_bytes_ours"] = tracks["ours"]["entry_bytes"][k - 1]
        results[f"long{k}{tag}_cache_entry_bytes_ratio"] = ratio(
            results[f"long{k}{tag}_cache_entry_bytes_ours"], results[f"long{k}{tag}_cache_bytes_stock"]
        )
        prefill_kept, keep_rate = kept
        if isinstance(keep_rate, Unmeasured):
            results[f"long{k}{tag}_cache_bytes_floor_ratio"] = keep_rate
            results[f"long{k}{tag}_decode_time_floor_ratio"] = keep_rate
            continue
        sparse_entries = prefill_kept + keep_rate * (k - 1)
        dense_entries = prompt + k - 1
        results[f"long{k}{tag}_cache_bytes_floor_ratio"] = (
            sparse_layer * dense_entries + (layers - sparse_layer) * sparse_entries
        ) / (layers * dense_entries)
        floor, dense = decode_step_flops(ctx, prompt + k // 2, prefill_kept + int(keep_rate * k / 2))
        results[f"long{k}{tag}_decode_time_floor_ratio"] = floor / dense
    results[f"long_generation{tag}_keep_rate"] = kept[1]
    results[f"long_generation{tag}_curve"] = {which: tracks[which]["bytes"] for which in WHICH}
    results[f"long_generation{tag}_time_curve"] = {w: step_times(tracks[w]["clock"]) for w in tracks}
    return results


def measure_long_generation(ctx: BenchContext) -> dict[str, Any]:
    """`long_generation_at` each batch of `long_batches` (batch 1 first), one results dict."""
    lengths = sorted(ctx.settings.long_tokens)
    results: dict[str, Any] = {"memory": {}, "long_tokens": lengths, "long_batches": ctx.settings.long_batches}
    for batch in ctx.settings.long_batches:
        part = long_generation_at(ctx, batch, lengths)
        results["memory"].update(part.pop("memory"))
        results.update(part)
    return results


# ---- compiled ---------------------------------------------------------------------------------------------------


def measure_compiled(ctx: BenchContext) -> dict[str, Any]:
    """Ours (DynamicLlavaStaticCache) and stock (StaticCache), both compiled by generate(): time to first token and
    decode time per token at the main batch over N, tokens/s at `compile_batches`; compile wall time (cold run minus
    steady), graphs and graph breaks. A side that does not compile is reported under `compiled_errors`."""
    from torch._dynamo.utils import counters

    settings = ctx.settings
    config = compile_config(ctx.device, settings.compile_mode)
    static = dict(cache_implementation="static", compile_config=config)
    results: dict[str, Any] = {"compiled_mode": config.mode, "compiled_errors": {}, "memory": {}}

    def cold_run(run: Callable[[], Any], name: str, which: str) -> float:
        """The cold run's wall time (it compiles for this batch and cache length). Memory: on CUDA of the cold run
        (a CUDA-graph pool is allocated there); elsewhere of a further, steady run (compiling takes memory)."""
        with peak_memory(ctx.device) if ctx.cuda else nullcontext({}) as record:
            _, cold = wall_time(run)
        if not ctx.cuda:
            with peak_memory(ctx.device) as record:
                run()
        ctx.record_memory(results["memory"], name, which, record)
        return cold

    for which in WHICH:
        torch._dynamo.reset()
        counters.clear()
        try:
            compile_wall = 0.0
            first = ctx.gen(which, ctx.inputs, settings.new_tokens, **static)
            cold = cold_run(first, f"compiled_decode_batch{settings.batch_size}", which)
            one = ctx.gen(which, ctx.inputs, 1, **static)
            one()
            t1, tn = median_time(one, settings.repeats), median_time(first, settings.repeats)
            compile_wall += max(cold - tn, 0.0)
            results[f"compiled_time_to_first_token_{which}_s"] = timed(t1)
            results[f"compiled_decode_time_per_token_{which}_s"] = per_step_time(tn, t1, settings.new_tokens - 1)
            for b in settings.compile_batches:
                run = ctx.gen(which, ctx.inputs_at(b, 2), settings.throughput_tokens, **static)
                cold = cold_run(run, f"compiled_throughput_batch{b}", which)
                steady = median_time(run, settings.repeats)
                compile_wall += max(cold - steady, 0.0)
                results[f"compiled_batch{b}_tokens_per_s_{which}"] = b * settings.throughput_tokens / steady
            results[f"compiled_compile_wall_{which}_s"] = compile_wall
            results[f"compiled_unique_graphs_{which}"] = int(counters["stats"]["unique_graphs"])
            results[f"compiled_graph_breaks_{which}"] = int(sum(counters["graph_break"].values()))
        except Exception as error:  # a model that does not compile here: reported, the rest of the bench goes on
            results["compiled_errors"][which] = repr(error)[:2000]
        finally:
            torch._dynamo.reset()
    for key in ("compiled_time_to_first_token", "compiled_decode_time_per_token"):
        if f"{key}_ours_s" in results and f"{key}_stock_s" in results:
            results[f"{key}_ratio"] = ratio(results[f"{key}_ours_s"], results[f"{key}_stock_s"])
    for b in settings.compile_batches:
        key = f"compiled_batch{b}_tokens_per_s"
        if f"{key}_ours" in results and f"{key}_stock" in results:
            results[f"{key}_ratio"] = ratio(results[f"{key}_ours"], results[f"{key}_stock"])
    results["compile_batches"] = list(settings.compile_batches)
    return results


# ---- the largest batch in a memory budget -----------------------------------------------------------------------


def measure_memory_budget(ctx: BenchContext, results: dict[str, Any]) -> dict[str, Any]:
    """
    The largest batch whose footprint (own weights + the growth of the peak during a generate of `budget_tokens`
    tokens: CUDA's allocator peak, on the CPU the peak RSS) fits `memory_budget_gb` GiB, ours and stock: each probe a
    real generate (an out-of-memory probe does not fit), doubling from the line through the decode runs'
    footprints, then bisection (`search_largest_batch`). Then tokens/s of generate(T) at each model's own largest
    batch, and their ratio.
    """
    settings = ctx.settings
    budget, tokens = int(settings.memory_budget_gb * GiB), settings.budget_tokens
    out: dict[str, Any] = {"memory_budget_gb": settings.memory_budget_gb, "memory_budget_new_tokens": tokens}
    peak = "max_memory_allocated" if ctx.cuda else "peak RSS (VmHWM, reset per probe)"
    out["memory_budget_method"] = (
        f"bisection with real allocation: each probe a generate of {tokens} new tokens, footprint = own weights + "
        f"growth of the {peak} over the run's start; doubling from a linear estimate, then bisection"
    )
    limit = BUDGET_BATCH_LIMIT["cuda" if ctx.cuda else "cpu"]
    out["memory_budget_batch_limit"] = limit
    probes = {}
    for which in WHICH:

        def footprint(b: int, which: str = which) -> int | None:
            try:
                with peak_memory(ctx.device) as record:
                    ctx.gen(which, ctx.inputs_at(b, 4), tokens)()
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                return None
            return footprint_bytes(record, ctx.weights[which])

        measured = {
            int(run.removeprefix("decode_batch")): sides[which]["footprint_bytes"]
            for run, sides in results.get("memory", {}).items()
            if run.startswith("decode_batch") and sides.get(which, {}).get("footprint_bytes")
        }
        start = estimate_largest_batch(measured, budget) or 1
        out[f"max_batch_{which}"], probes[which] = search_largest_batch(
            footprint, budget, start=min(max(start, 1), limit), limit=limit
        )
    out["memory_budget_probes"] = probes
    out["max_batch_ratio"] = ratio(out["max_batch_ours"], out["max_batch_stock"] or None)
    for which in WHICH:
        b = out[f"max_batch_{which}"]
        if not b:
            out[f"max_batch_tokens_per_s_{which}"] = Unmeasured(
                f"not even batch 1 fits {settings.memory_budget_gb} GiB"
            )
            continue
        run = ctx.gen(which, ctx.inputs_at(b, 2), settings.throughput_tokens)
        run()
        seconds = timed(median_time(run, settings.repeats))
        out[f"max_batch_tokens_per_s_{which}"] = (
            seconds if isinstance(seconds, Unmeasured) else b * settings.throughput_tokens / seconds
        )
    out["max_batch_tokens_per_s_ratio"] = ratio(out["max_batch_tokens_per_s_ours"], out["max_batch_tokens_per_s_stock"])
    return out
