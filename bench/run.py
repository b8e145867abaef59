"""`dynamic-llava bench`: Dynamic-LLaVA vs the stock transformers model of its base (LLaVA-1.5, LLaVA-NeXT or
Qwen2.5-VL, `bench.stock`) on the same weights, in one process; the per-base parts (presets, prompts, image inputs)
are `bench.bases`.

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
* Floors of time ratios: the ratio if only the kept work were done, from the FLOPs of the kept tokens (prefill and
  time to first token: the whole-model prefill floor; decode: one step over the kept keys at the middle of N;
  tokens/s: stock work / kept work, a ceiling).
* Long generations (`long_tokens`): one generate of the longest length per side, every forward timed: decode time
  per token and cache bytes at each length; `cache_bytes_long_generation.png` plots the bytes per generated token.
* No-cache decoding: decode time per token with `use_cache=False` (each step runs the whole sequence again).
* Attention masks built per decode step: ours' float masks (`sparse_masks.attention_mask_for`), stock's
  `create_causal_mask` results, counted by wrapping them (one per forward, shared by every layer, is the design).
* A measure the run cannot compute (one new token: no decode step; no generated token scored; a time difference not
  above the clock's resolution) is None (JSON null), its reason under `results["missing"]`, "n/a (reason)" in the
  table: never a negative time or a rate of nothing.
* The attention scorer (`image_scorer="attention"`, FastV's training-free rule, the same keep budget) beside ours:
  its prefill LLM FLOPs (the attention of layer l - 1 it recomputes included) and prefill time against the same
  stock values (`attention_scorer_*`).
* With random weights the output-text predictor keeps all or nothing, so its last bias is shifted until the median
  margin is 0 (about half kept, the trained behaviour at output_text_keep_rate 0.5); the keep rates actually seen
  are reported. Vision pruning keeps the top int(tokens * vision_keep_rate) of each image whatever the weights.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import platform
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers.utils import logging

from ..files import atomic_write_text
from ..hub.folder import parse_dtype
from ..sparse_settings import PER_CALL_FIELDS, SparsityKwargs
from . import measures
from .bases import bench_base
from .context import BenchContext, BenchSettings, Unmeasured, bench_inputs, preset_model
from .memory import peak_rss_bytes, reset_peak_rss
from .presets import DEFAULT_PRESET, PRESETS
from .stock import stock_model
from .timing import compile_config, generate, median_time, wall_time

__all__ = [
    "PRESETS",
    "bench_inputs",
    "compile_config",
    "format_table",
    "generate",
    "median_time",
    "peak_rss_bytes",
    "preset_model",
    "reset_peak_rss",
    "run_bench",
    "wall_time",
    "write_outputs",
]

logger = logging.get_logger(__name__)

THROUGHPUT_BATCHES = (1, 8, 32)
LONG_TOKENS = {"cpu": (512, 1024), "cuda": (1024, 2048)}  # default lengths of the long generations, by device
GiB = 2**30


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


def merge(results: dict[str, Any], part: dict[str, Any]) -> None:
    """Merge one measure's dict into `results`: an `Unmeasured` value becomes None with its reason under
    `results["missing"]`; the `memory` runs are merged run by run, side by side."""
    for key, value in part.items():
        if key == "memory":
            for run, sides in value.items():
                results["memory"].setdefault(run, {}).update(sides)
        elif isinstance(value, Unmeasured):
            results[key] = None
            results["missing"][key] = value.reason
        else:
            results[key] = value
            results["missing"].pop(key, None)


def footprint_ratios(memory: dict[str, Any]) -> dict[str, Any]:
    """`{run}_footprint_ratio` (ours / stock) of every memory run measured on both sides."""
    out = {}
    for run, sides in memory.items():
        ours, stock = (sides.get(which, {}).get("footprint_bytes") for which in ("ours", "stock"))
        if ours and stock:
            out[f"{run}_footprint_ratio"] = ours / stock
    return out


def fastest_decode(results: dict[str, Any]) -> dict[str, Any]:
    """The faster of eager and compiled decode time per token, ours against stock's."""
    best = {}
    for which in ("ours", "stock"):
        times = [results.get(f"{kind}decode_time_per_token_{which}_s") for kind in ("", "compiled_")]
        times = [t for t in times if t is not None]
        if not times:
            return {"fastest_decode_time_per_token_ratio": Unmeasured(f"no decode time of {which}")}
        best[which] = min(times)
    return dict(
        fastest_decode_time_per_token_ours_s=best["ours"],
        fastest_decode_time_per_token_stock_s=best["stock"],
        fastest_decode_time_per_token_ratio=best["ours"] / best["stock"],
    )


def _with_sparsity_parameters(function: Callable) -> Callable:
    """Give `function(..., **sparsity)` one keyword-only parameter per per-call field of `sparse_settings` (default
    None: the config's), so a front-end reads from its signature which fields it runs."""
    signature = inspect.signature(function)
    named = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    added = [
        inspect.Parameter(
            field, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=SparsityKwargs.__annotations__[field]
        )
        for field in PER_CALL_FIELDS
    ]
    function.__signature__ = signature.replace(parameters=named + added)
    return function


def _load(model: Any, preset: str, dtype: torch.dtype, device: str, seed: int) -> tuple[Any, str | None]:
    """The model to bench (given, from a folder or Hub id of any base, or a random one of `preset`), and the preset's
    name if random."""
    if model is None:
        return preset_model(preset, dtype, device, seed), preset
    if isinstance(model, (str, Path)):
        from ..hub.loading import load_model, model_folder

        return load_model(model_folder(str(model)), dtype=dtype).to(device).eval(), None
    return model, None


@_with_sparsity_parameters
def run_bench(
    model: Any = None,
    preset: str = DEFAULT_PRESET,
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
    budget_tokens: int | None = None,
    count_steps: int = 64,
    long_tokens: Sequence[int] | None = None,
    long_batches: Sequence[int] = (1,),
    nocache_tokens: int = 8,
    progress: bool = True,
    image_size: Sequence[int] | None = None,
    **sparsity: Any,
) -> dict[str, Any]:
    """
    Run the benchmark (module docstring) on `model` (a Dynamic model of any base, a folder or Hub id, or None: a
    random model of `preset`) against the stock model of its base on the same weights; progress goes to a tqdm bar
    and the logger. Returns the results (`format_table` makes the table the command prints); with `out`, also writes
    `results.json` and the plots there.

    Args:
        batch_size, new_tokens: the main run (FLOPs, KV bytes, prefill, time to first token, decode time per token).
        throughput_batches: batch sizes of the tokens/s runs (`throughput_tokens` new tokens each); default
            1, `throughput_batch` and 32.
        decode_batch: a second decode run over `new_tokens` at this batch (time per token, memory); None: none.
        ragged: batches of more than one row have rows of different lengths, left padded.
        compiled: also run both models compiled with static caches (default: on CUDA only); `compile_batches`:
            batch sizes of its tokens/s runs (default: `throughput_batches` on CUDA, none on the CPU; its decode time
            per token always runs at `batch_size`); `compile_mode`: the `torch.compile` mode.
        memory_budget_gb: find the largest batch whose footprint with `budget_tokens` new tokens (default
            `new_tokens`) fits, ours and stock, by bisection with real generates; tokens/s at each one's largest.
        count_steps: decode steps over which aten ops, host syncs and attention masks per step are counted (0: not).
        long_tokens: lengths of the long generations (default 512, 1024 on the CPU; 1024, 2048 on CUDA); (): none.
        long_batches: batch sizes of the long generations (default 1; rows ragged if `ragged`), each with its floor
            (stock from prompts as long as what ours keeps).
        nocache_tokens: new tokens of the `use_cache=False` decode timing (0 or 1: not run).
        image_size: (height, width) of the bench's image for a base that takes any size (LLaVA-NeXT, Qwen2.5-VL;
            default: the preset's, else the base's bench image, `bench.bases`); LLaVA-1.5's is its tower's.
        **sparsity: ours' per-call sparsity, one keyword per field of `sparse_settings.PER_CALL_FIELDS`, as
            `generate()` takes them (None: the config's).
    """
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if repeats < 3:
        logger.warning(
            f"[bench] repeats={repeats}: medians of fewer than 3 runs are not stable timings (a run moves by several "
            "percent on a busy machine); use --repeats 3 or more for numbers to report."
        )
    model, preset = _load(model, preset, parse_dtype(dtype) or torch.float32, device, seed)
    device = str(model.device)
    cuda = model.device.type == "cuda"
    sparsity = {field: value for field, value in sparsity.items() if value is not None}
    settings = model.config.sparsity_settings(**sparsity)  # checked before anything runs
    bench = _bench_settings(
        cuda, batch_size, new_tokens, repeats, seed, ragged, throughput_tokens, throughput_batch, throughput_batches,
        decode_batch, compiled, compile_batches, compile_mode, memory_budget_gb, budget_tokens, count_steps,
        long_tokens, long_batches, nocache_tokens,
    )  # fmt: skip
    ctx = _context(model, preset, image_size, bench, device, sparsity)
    text = model.config.text_config
    logger.info(
        f"[bench] {type(model).__name__}: {text.num_hidden_layers} layers, hidden {text.hidden_size}, "
        f"{measures.image_tokens(ctx) // batch_size} image tokens per row, prompt {ctx.prompt_tokens} tokens, batch "
        f"{batch_size}, {new_tokens} new tokens, {dtype} on {device}"
    )
    results = _header(ctx, preset, dtype, sparsity)
    plan = _plan(ctx, settings.use_output_text_predictor)
    phase = _Phases([name for name, _ in plan], progress)
    try:
        for name, step in plan:
            with phase(name):
                merge(results, step(results))
    finally:
        phase.close()
    merge(results, footprint_ratios(results["memory"]))
    if out:
        results["plots"] = write_outputs(results, Path(out))
    return results


def _context(
    model: Any,
    preset: str | None,
    image_size: Sequence[int] | None,
    bench: BenchSettings,
    device: str,
    sparsity: dict[str, Any],
) -> BenchContext:
    """The run's context: the bench image checked (`image_size`, else the preset's, else the base's), generation
    without EOS (exactly N new tokens), the stock model of the base on the same weights, the main inputs."""
    if image_size is None and preset is not None:
        image_size = PRESETS[preset].get("image")
    bench.image_size = bench_base(model.config).image_size(model.config, image_size)  # checked before loading more
    model.generation_config.eos_token_id = None  # same work for both models: exactly N new tokens
    model.generation_config.pad_token_id = 0
    return BenchContext(
        model=model,
        stock=stock_model(model),
        inputs=bench_inputs(model, bench.batch_size, bench.seed, bench.ragged, bench.image_size),
        settings=bench,
        device=device,
        sparsity=sparsity,
    )


def _header(ctx: BenchContext, preset: str, dtype: str, sparsity: dict[str, Any]) -> dict[str, Any]:
    """What the run measured on: machine, versions, model shape, settings (the results' first entries)."""
    text = ctx.model.config.text_config
    return {
        "machine": platform_summary(ctx.device),
        "transformers": transformers.__version__,
        "preset": preset,
        "base": bench_base(ctx.model.config).name,
        "image_size": list(ctx.settings.image_size) if ctx.settings.image_size else None,
        "image_tokens_per_row": measures.image_tokens(ctx) // ctx.settings.batch_size,
        "batch_size": ctx.settings.batch_size,
        "new_tokens": ctx.settings.new_tokens,
        "dtype": dtype,
        "repeats": ctx.settings.repeats,
        "ragged_rows": ctx.settings.ragged,
        "sparsity": sparsity,
        "prompt_tokens": ctx.prompt_tokens,
        "num_layers": text.num_hidden_layers,
        "sparse_layer": ctx.model.config.sparse_layer,
        "weight_bytes_ours": ctx.weights["ours"],
        "weight_bytes_stock": ctx.weights["stock"],
        "memory": {},
        "missing": {},
    }


def _bench_settings(cuda: bool, batch_size: int, new_tokens: int, repeats: int, seed: int, ragged: bool,
                    throughput_tokens: int, throughput_batch: int, throughput_batches: Sequence[int] | None,
                    decode_batch: int | None, compiled: bool | None, compile_batches: Sequence[int] | None,
                    compile_mode: str | None, memory_budget_gb: float | None, budget_tokens: int | None,
                    count_steps: int, long_tokens: Sequence[int] | None, long_batches: Sequence[int],
                    nocache_tokens: int) -> BenchSettings:  # fmt: skip
    """`run_bench`'s arguments as the run's settings, defaults resolved (by device where they depend on it)."""
    if throughput_batches is None:
        throughput_batches = sorted({1, throughput_batch, *THROUGHPUT_BATCHES[2:]})
    if not long_batches or any(int(b) < 1 for b in long_batches):
        raise ValueError(f"long_batches must be positive batch sizes, got {list(long_batches)}")
    long_tokens = LONG_TOKENS["cuda" if cuda else "cpu"] if long_tokens is None else long_tokens
    bench = BenchSettings(
        batch_size=batch_size,
        new_tokens=new_tokens,
        repeats=repeats,
        seed=seed,
        ragged=ragged,
        throughput_tokens=throughput_tokens,
        throughput_batches=sorted({int(b) for b in throughput_batches}),
        decode_batch=decode_batch if decode_batch and decode_batch != batch_size else None,
        compiled=cuda if compiled is None else compiled,
        compile_batches=sorted(
            {int(b) for b in (throughput_batches if compile_batches is None and cuda else compile_batches or ())}
        ),
        compile_mode=compile_mode,
        memory_budget_gb=memory_budget_gb,
        budget_tokens=budget_tokens or new_tokens,
        count_steps=count_steps,
        long_tokens=sorted({int(k) for k in long_tokens if int(k) >= 2}),
        long_batches=sorted({int(b) for b in long_batches}),
        nocache_tokens=nocache_tokens,
    )
    return bench


def _plan(ctx: BenchContext, calibrate: bool) -> list[tuple[str, Callable[[dict[str, Any]], dict[str, Any]]]]:
    """The phases that run, in order: (name, results so far -> that measure's dict)."""
    s = ctx.settings
    plan: list[tuple[str, Callable[[dict[str, Any]], dict[str, Any]]]] = []
    if calibrate:
        plan.append(("calibrate", lambda r: measures.calibrate(ctx)))
    plan += [
        ("prefill FLOPs", lambda r: measures.measure_prefill_flops(ctx)),
        ("prefill time", lambda r: measures.measure_prefill_time(ctx)),
        ("attention scorer", lambda r: measures.measure_attention_scorer(ctx, r)),
        ("decode", lambda r: measures.measure_decode(ctx, _first_token_times(r))),
        ("no-cache decode FLOPs", lambda r: measures.measure_nocache_flops(ctx)),
        ("floors", lambda r: measures.measure_floors(ctx, r)),
    ]
    if s.nocache_tokens >= 2:
        plan.append(("no-cache decode time", lambda r: measures.measure_nocache_decode(ctx)))
    if s.decode_batch:
        plan.append((f"decode batch {s.decode_batch}", lambda r: measures.measure_decode_batch(ctx)))
    if s.count_steps:
        plan.append(("ops and syncs per step", lambda r: measures.measure_ops_per_step(ctx)))
        plan.append(("attention masks per step", lambda r: measures.measure_mask_builds(ctx)))
        plan.append(("SDPA masks per step", lambda r: measures.measure_sdpa_masks(ctx)))
    plan.append(("tokens/s", lambda r: measures.measure_throughput(ctx)))
    if s.long_tokens:
        plan.append((f"long generation {s.long_tokens[-1]}", lambda r: measures.measure_long_generation(ctx)))
    if s.compiled:
        plan.append(("compiled", lambda r: measures.measure_compiled(ctx)))
        plan.append(("fastest", fastest_decode))
    if s.memory_budget_gb:
        plan.append(("memory budget", lambda r: measures.measure_memory_budget(ctx, r)))
    return plan


def _first_token_times(results: dict[str, Any]) -> dict[str, Any]:
    """Time to first token per side, an `Unmeasured` where it is missing."""
    return {
        which: results[f"time_to_first_token_{which}_s"]
        if results.get(f"time_to_first_token_{which}_s") is not None
        else Unmeasured(results["missing"].get(f"time_to_first_token_{which}_s", "no time to first token"))
        for which in ("ours", "stock", "off")
    }


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


PREFILL_PART_LABELS = {
    "vision": "vision tower and projector",
    "dense_layers": "dense layers (below sparse_layer)",
    "predictors": "image predictor",
    "sparse_layers": "layers from sparse_layer on",
    "head": "LM head",
    "rest": "the rest (embedding, merging, selection, masks)",
}


def _prefill_rows() -> list[tuple[str, str, str | None, str | None, Callable[[float], str] | None]]:
    """`_rows` of the prefill: FLOPs, time, its floors and its time by part."""
    return [
        ("prefill LLM FLOPs", "prefill_llm_flops_ratio", "prefill_llm_flops_floor_ratio", "prefill_llm_flops", _flops),
        (
            "prefill whole-model FLOPs",
            "prefill_total_flops_ratio",
            "prefill_total_flops_floor_ratio",
            "prefill_total_flops",
            _flops,
        ),
        ("prefill time", "prefill_time_ratio", "prefill_time_floor_ratio", "prefill_time_{}_s", _seconds),
        (
            "prefill time, ours / stock on the kept length (measured floor)",
            "prefill_time_vs_floor_ratio",
            None,
            None,
            None,
        ),
        (
            "prefill time, ours / stock's vision, dense layers and head on the prompt and later layers on the kept"
            " length (parts floor)",
            "prefill_time_vs_parts_floor_ratio",
            None,
            None,
            None,
        ),
        *[
            (
                f"prefill time by part: {label}",
                f"prefill_part_{part}_ratio",
                None,
                f"prefill_part_{part}_{{}}_s",
                _seconds,
            )
            for part, label in PREFILL_PART_LABELS.items()
        ],
    ]


def _rows(results: dict[str, Any]) -> list[tuple[str, str, str | None, str | None, Callable[[float], str] | None]]:
    """(label, ratio key, floor key, key prefix of the ours/stock values, formatter) for every measure present."""
    r = "(ragged rows)" if results.get("ragged_rows") else ""
    b = results.get("batch_size", 1)
    rows = [
        *_prefill_rows(),
        (
            "prefill LLM FLOPs, attention scorer (FastV)",
            "attention_scorer_prefill_llm_flops_ratio",
            "attention_scorer_prefill_llm_flops_floor_ratio",
            "attention_scorer_prefill_llm_flops",
            _flops,
        ),
        (
            "prefill time, attention scorer (FastV)",
            "attention_scorer_prefill_time_ratio",
            "prefill_time_floor_ratio",
            "attention_scorer_prefill_time_{}_s",
            _seconds,
        ),
        (
            f"time to first token, batch {b}",
            "time_to_first_token_ratio",
            "prefill_time_floor_ratio",
            "time_to_first_token_{}_s",
            _seconds,
        ),
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
            "decode_time_floor_ratio",
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
                "prefill_time_floor_ratio",
                f"batch{n}_time_to_first_token_{{}}_s",
                _seconds,
            ),
            (
                f"decode time/token, batch {n} {r}",
                f"batch{n}_decode_time_per_token_ratio",
                "decode_time_floor_ratio",
                f"batch{n}_decode_time_per_token_{{}}_s",
                _seconds,
            ),
        ]
    for n in batches:
        rows.append(
            (
                f"tokens/s, batch {n} {r if n > 1 else ''}",
                f"batch{n}_tokens_per_s_ratio",
                "tokens_per_s_floor_ratio",
                f"batch{n}_tokens_per_s_{{}}",
                _rate,
            )
        )
    for n in batches:
        for measure, label in (("aten_ops", "aten ops"), ("host_syncs", "host syncs")):
            key = f"batch{n}_{measure}_per_step"
            rows.append((f"{label}/decode step, batch {n}", f"{key}_ratio", None, f"{key}_{{}}", _count))
    return rows + _nocache_rows(results) + _later_rows(results)


def _nocache_rows(results: dict[str, Any]) -> list:
    """`_rows` of the decoding without a cache: time per token with its FLOP floor, and ours / the measured floor."""
    k, b = results.get("nocache_tokens"), results.get("batch_size", 1)
    return [
        (
            f"decode time/token, no cache ({k} tokens), batch {b}",
            "nocache_decode_time_per_token_ratio",
            "nocache_decode_flops_floor_ratio",
            "nocache_decode_time_per_token_{}_s",
            _seconds,
        ),
        (
            "decode time/token, no cache, ours / stock on the kept length (measured floor)",
            "nocache_decode_time_vs_floor_ratio",
            None,
            None,
            None,
        ),
    ]


def _long_rows(results: dict[str, Any]) -> list:
    """`_rows` of the long generations, per batch of `long_batches` and length of `long_tokens`."""
    rows: list = []
    for batch in results.get("long_batches", [1]):
        tag = "" if batch == 1 else f"_b{batch}"
        rows_of = "batch 1" if batch == 1 else f"batch {batch}" + (" ragged" if results.get("ragged_rows") else "")
        for n in results.get("long_tokens", []):
            rows += [
                (
                    f"long generation: decode time/token over {n} tokens, {rows_of}",
                    f"long{n}{tag}_decode_time_per_token_ratio",
                    f"long{n}{tag}_decode_time_floor_ratio",
                    f"long{n}{tag}_decode_time_per_token_{{}}_s",
                    _seconds,
                ),
                (
                    f"long generation: same, ours / stock on the kept length (measured floor), {rows_of}",
                    f"long{n}{tag}_decode_time_vs_floor_ratio",
                    None,
                    None,
                    None,
                ),
                (
                    f"long generation: same, stock with no context / stock (no pruning goes below), {rows_of}",
                    f"long{n}{tag}_decode_time_no_context_ratio",
                    None,
                    None,
                    None,
                ),
                (
                    f"long generation: cache bytes after {n} tokens, {rows_of}",
                    f"long{n}{tag}_cache_bytes_ratio",
                    f"long{n}{tag}_cache_bytes_floor_ratio",
                    f"long{n}{tag}_cache_bytes",
                    _bytes,
                ),
            ]
            if batch > 1:  # (at batch 1 storage and kept entries are the same)
                rows.append(
                    (
                        f"long generation: kept entries' bytes after {n} tokens (no row padded), {rows_of}",
                        f"long{n}{tag}_cache_entry_bytes_ratio",
                        f"long{n}{tag}_cache_bytes_floor_ratio",
                        None,
                        None,
                    )
                )
    return rows


def _later_rows(
    results: dict[str, Any],
) -> list[tuple[str, str, str | None, str | None, Callable[[float], str] | None]]:
    """`_rows` of the long generations, the compiled runs and the memory measures."""
    b = results.get("batch_size", 1)
    rows: list = _long_rows(results)
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
    if "max_batch_tokens_per_s_ratio" in results:
        rows.append(
            (
                "tokens/s at each one's largest batch in the budget",
                "max_batch_tokens_per_s_ratio",
                None,
                "max_batch_tokens_per_s_{}",
                _rate,
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
    return tuple("n/a" if v is None else fmt(v) for v in pair)  # type: ignore[return-value]


def _missing(results: dict[str, Any], key: str) -> str:
    """ "n/a (why)" of a measure the run could not compute."""
    return f"n/a ({results.get('missing', {}).get(key, 'not measured')})"


def _ratio_text(results: dict[str, Any], key: str | None) -> str:
    if key is None or key not in results:
        return ""
    return _missing(results, key) if results[key] is None else f"{results[key]:.3f}"


def format_table(results: dict[str, Any]) -> str:
    """The measures of `results` as a Markdown table (what `dynamic-llava bench` prints): ours, stock, the ratio
    ours / stock and, where there is one, its floor (only the kept work done). A measure the run could not compute
    reads "n/a (why)"; one that did not run is left out."""
    lines = ["| measure | ours | stock | ours / stock | floor |", "|---|---|---|---|---|"]
    for label, key, floor, values, fmt in _rows(results):
        ours, stock = _values(results, values, fmt)
        if key not in results and ours in ("", "n/a"):  # (a value without a ratio, e.g. ours' predictor, is shown)
            continue
        lines.append(
            f"| {label.strip()} | {ours} | {stock} | {_ratio_text(results, key)} | {_ratio_text(results, floor)} |"
        )
    lines.append(f"| observed vision keep rate | {results['vision_keep_rate']:.3f} | | | |")
    if "output_text_keep_rate" in results:
        rate = results["output_text_keep_rate"]
        scored = results.get("output_text_scored_tokens")
        text = _missing(results, "output_text_keep_rate") if rate is None else f"{rate:.3f} ({scored} tokens scored)"
        lines.append(f"| observed output-text keep rate | {text} | | | |")
    if "masks_per_step_ours" in results:
        lines.append(
            f"| attention masks built/decode step ({results['num_layers']} layers) | "
            f"{_count(results['masks_per_step_ours'])} | {_count(results['masks_per_step_stock'])} | | |"
        )
    sdpa_batches = sorted({int(k[5:].split("_")[0]) for k in results if k.endswith("_sdpa_float_masks_per_step_ours")})
    for b in sdpa_batches:
        for kind in ("float", "bool", "none"):
            ours, stock = (_count(results[f"batch{b}_sdpa_{kind}_masks_per_step_{w}"]) for w in ("ours", "stock"))
            lines.append(f"| SDPA calls/decode step with a {kind} mask, batch {b} | {ours} | {stock} | | |")
        for kernel in measures.SDPA_KERNELS:
            taken = [results.get(f"batch{b}_sdpa_kernel_{kernel}_per_step_{w}") for w in ("ours", "stock")]
            if any(t is not None for t in taken):
                ours, stock = (_count(t or 0) for t in taken)
                lines.append(f"| SDPA calls/decode step to the {kernel} kernel, batch {b} | {ours} | {stock} | | |")
    for which, error in results.get("compiled_errors", {}).items():
        lines.append(f"| compiled {which} failed | {error.splitlines()[0][:80]} | | | |")
    if "compiled_compile_wall_ours_s" in results or "compiled_compile_wall_stock_s" in results:
        walls = [results.get(f"compiled_compile_wall_{w}_s") for w in ("ours", "stock")]
        text = ["" if w is None else f"{w:.0f} s" for w in walls]
        lines.append(f"| compile wall time ({results.get('compiled_mode')}) | {text[0]} | {text[1]} | | |")
    if results.get("memory_budget_method"):
        lines.append(f"\nlargest batch: {results['memory_budget_method']}")
    if results.get("masks_per_step_method"):
        lines.append(f"attention masks: {results['masks_per_step_method']}")
    plots = results.get("plots")
    if plots:
        lines.append("plots: " + (", ".join(plots["written"]) if plots["written"] else f"none ({plots['skipped']})"))
    return "\n".join(lines)


def write_outputs(results: dict[str, Any], folder: str | os.PathLike) -> dict[str, Any]:
    """`results.json` and, with matplotlib, the plots in `folder`: `kv_bytes.png` (KV bytes per generated token of
    the main run), `cache_bytes_long_generation.png` (of the long generation) and `prefill_flops_by_layer.png`.
    Returns `{"written": [file names], "skipped": why none were drawn, or None}` (also stored in results.json)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plots: dict[str, Any] = {"written": [], "skipped": None}
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plots["skipped"] = "matplotlib is not installed (pip install matplotlib)"
        logger.warning(f"[bench] no plots: {plots['skipped']}")
        print(f"[bench] no plots: {plots['skipped']}", file=sys.stderr)
    else:
        curves = [("kv_bytes.png", "kv_bytes_curve", "KV-cache bytes vs generated length")]
        curves.append(("cache_bytes_long_generation.png", "long_generation_curve", "Cache bytes, long generation"))
        for name, key, title in curves:
            if key in results:
                _plot_curves(plt, results[key], title, folder / name)
                plots["written"].append(name)
        _plot_layers(plt, results["prefill_flops_by_layer"], folder / "prefill_flops_by_layer.png")
        plots["written"].append("prefill_flops_by_layer.png")
        if "long_tokens" in results:
            _plot_long(plt, results, folder / "long_generation.png")
            plots["written"].append("long_generation.png")
    results = dict(results, plots=plots)
    atomic_write_text(folder / "results.json", json.dumps(results, indent=2, default=_json_default) + "\n")
    return plots


def _plot_curves(plt: Any, curve: dict[str, list[int]], title: str, path: Path) -> None:
    """Cache bytes (`curve[side][i]`: after forward i) vs generated tokens, ours and stock."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for which in ("stock", "ours"):
        ax.plot(range(1, len(curve[which]) + 1), [b / 2**20 for b in curve[which]], label=which)
    ax.set_xlabel("generated tokens")
    ax.set_ylabel("KV cache (MiB)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_long(plt: Any, results: dict[str, Any], path: Path) -> None:
    """Two panels over the generated tokens of the long generations, each batch: decode time per token (32-step
    windows; ours, stock, and stock on the kept length) and cache bytes (ours, stock)."""
    fig, (time_ax, bytes_ax) = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"ours": "-", "stock": "--", "floor": ":"}
    for batch in results.get("long_batches", [1]):
        tag = "" if batch == 1 else f"_b{batch}"
        for which, values in results.get(f"long_generation{tag}_time_curve", {}).items():
            label = f"{'stock, kept length' if which == 'floor' else which}, batch {batch}"
            xs = [32 * (i + 1) for i in range(len(values))]
            time_ax.plot(xs, [v * 1e3 for v in values], styles[which], label=label)
        for which, values in results.get(f"long_generation{tag}_curve", {}).items():
            bytes_ax.plot(
                range(1, len(values) + 1), [b / 2**20 for b in values], styles[which], label=f"{which}, batch {batch}"
            )
    time_ax.set(xlabel="generated tokens", ylabel="decode time per token (ms)", title="Decode time per token")
    bytes_ax.set(xlabel="generated tokens", ylabel="KV cache (MiB)", title="Cache bytes")
    time_ax.legend(fontsize=7)
    bytes_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_layers(plt: Any, by_layer: dict[str, list[int]], path: Path) -> None:
    """Prefill FLOPs per decoder layer, ours and stock side by side."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar([i - 0.2 for i in range(len(by_layer["stock"]))], [f / 1e9 for f in by_layer["stock"]], 0.4, label="stock")
    ax.bar([i + 0.2 for i in range(len(by_layer["ours"]))], [f / 1e9 for f in by_layer["ours"]], 0.4, label="ours")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("prefill GFLOPs")
    ax.set_title("Prefill FLOPs by layer")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
