"""The run context of the bench: what every measure reads (both models, the main inputs, the settings, the device),
the random preset models and prompts, and how a measure that cannot be computed is reported (`Unmeasured`).

A measure function returns a flat dict of results; a value it cannot compute from the run is an `Unmeasured` with
the reason, which `run_bench` records as None (JSON null) with the reason under `results["missing"]`, and the table
prints as "n/a (reason)". No measure is ever a number made up for a missing one (a negative time, a rate of nothing).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel

from ..hub.bases import BASES
from ..sparse_settings import SPARSITY_OFF
from .bases import BENCH_BASES, bench_base
from .memory import footprint_bytes, weight_bytes
from .presets import PRESETS
from .timing import CLOCK_RESOLUTION_S, generate

__all__ = [
    "BenchContext",
    "BenchSettings",
    "Unmeasured",
    "bench_inputs",
    "per_step_time",
    "preset_model",
    "ratio",
    "timed",
]

PROMPT_TEXT_TOKENS = 60
IMAGE_TOKEN_ID = 32000
RAGGED_STEP = 3  # tokens the question of each further row is shortened by (cycling over RAGGED_LENGTHS rows)
RAGGED_LENGTHS = 8
WHICH = ("ours", "stock")


# ---- missing measures -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unmeasured:
    """A measure the run cannot compute, and why (e.g. "1 new token: no decode step")."""

    reason: str


Value = float | int | Unmeasured | None


def ratio(ours: Value, stock: Value) -> float | Unmeasured:
    """`ours / stock`, or the `Unmeasured` of a side that is missing (a stock value of 0 has no ratio)."""
    for value in (ours, stock):
        if isinstance(value, Unmeasured):
            return value
        if value is None:
            return Unmeasured("not measured in this run")
    if stock == 0:
        return Unmeasured("the stock value is 0")
    return ours / stock


def timed(seconds: float) -> float | Unmeasured:
    """A wall time, or `Unmeasured` when it is not above the clock's resolution."""
    if seconds <= CLOCK_RESOLUTION_S:
        return Unmeasured(f"{seconds:.2e} s is not above the clock's resolution ({CLOCK_RESOLUTION_S:.0e} s)")
    return seconds


def per_step_time(total: float, first: float, steps: int) -> float | Unmeasured:
    """
    Time per decode step = (time of generate(1 + steps) - time of generate(1)) / steps, or `Unmeasured` when there
    is no step (`steps` < 1) or the difference is not above the clock's resolution (the noise of the two runs is
    larger than `steps` decode steps: more new tokens are needed).
    """
    if steps < 1:
        return Unmeasured(f"{steps + 1} new token(s): no decode step")
    difference = total - first
    if difference <= CLOCK_RESOLUTION_S:
        return Unmeasured(
            f"generate({steps + 1}) - generate(1) = {difference * 1e3:.2f} ms: too few decode steps to time"
        )
    return difference / steps


# ---- the models and the prompts ---------------------------------------------------------------------------------


def preset_model(
    name: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0
) -> PreTrainedModel:
    """A random model of preset `name` (`PRESETS`), of its base's Dynamic class (`spec["base"]`, the registry
    `hub.bases.BASES`), sdpa attention, in eval mode. LLaVA-1.5: one image is `(image_size / patch_size) ** 2`
    tokens; the other bases: see `bench.bases`."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    spec = PRESETS[name]
    config = BENCH_BASES[spec["base"]].build_config(spec)
    for sub in (config, config.text_config, config.vision_config):
        sub._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        model = BASES[spec["base"]].load_model_class()(config)
    return model.to(dtype).eval()


def bench_inputs(
    model: PreTrainedModel,
    batch_size: int,
    seed: int = 0,
    ragged: bool = False,
    image_size: tuple[int, int] | None = None,
) -> dict[str, torch.Tensor]:
    """
    `batch_size` rows: BOS, ~35 system tokens, the image, ~25 question tokens (random ids), random images, one per
    row. With `ragged`, row i's question is `3 * (i % 8)` tokens shorter and the rows are left padded (pad id 0).
    `image_size`: (height, width) of the image where the base takes any size (default: its bench image,
    `bench.bases`).

    Returns `input_ids` and `attention_mask` `[batch, prompt]` (long) and the base's image inputs (`bench.bases`):
    LLaVA-1.5 `pixel_values` `[batch, 3, side, side]`; LLaVA-NeXT `pixel_values` `[batch, tiles, 3, side, side]` and
    `image_sizes` `[batch, 2]`; Qwen2.5-VL `pixel_values` `[batch * h * w, 3 * 2 * patch**2]` and `image_grid_thw`
    `[batch, 3]` (and `mm_token_type_ids` `[batch, prompt]` where the stock model takes it). The image
    placeholders are as many as the model makes of each image.
    """
    g = torch.Generator().manual_seed(seed)
    config = model.config
    adapter = bench_base(config)
    image_size = adapter.image_size(config, image_size)
    placeholder = adapter.image_placeholder(config, adapter.image_tokens(model, image_size))
    limit = min([config.text_config.vocab_size, *adapter.special_ids(config)])
    before, after = 36, PROMPT_TEXT_TOKENS - 36
    rows = []
    for i in range(batch_size):
        text = torch.randint(3, limit, (before + after,), generator=g)
        question = after - (RAGGED_STEP * (i % RAGGED_LENGTHS) if ragged else 0)
        rows.append(torch.cat([torch.tensor([1]), text[:before], placeholder, text[before : before + question]]))
    width = max(row.numel() for row in rows)
    input_ids = torch.zeros(batch_size, width, dtype=torch.long)
    attention_mask = torch.zeros(batch_size, width, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - row.numel() :] = row
        attention_mask[i, width - row.numel() :] = 1
    return {
        "input_ids": input_ids.to(model.device),
        "attention_mask": attention_mask.to(model.device),
        **adapter.image_inputs(model, batch_size, image_size, g),  # (drawn after the text, as always)
        **{k: v.to(model.device) for k, v in adapter.token_inputs(config, input_ids).items()},
    }


# ---- the run context --------------------------------------------------------------------------------------------


@dataclass
class BenchSettings:
    """What runs: batch sizes, token counts and repeats of each measure (see `run_bench`)."""

    batch_size: int = 1
    new_tokens: int = 512
    repeats: int = 3
    seed: int = 0
    ragged: bool = True
    throughput_tokens: int = 64
    throughput_batches: list[int] = field(default_factory=lambda: [1, 8, 32])
    decode_batch: int | None = 8
    compiled: bool = False
    compile_batches: list[int] = field(default_factory=list)
    compile_mode: str | None = None
    memory_budget_gb: float | None = None
    budget_tokens: int = 64
    count_steps: int = 64
    long_tokens: list[int] = field(default_factory=lambda: [512, 1024])
    long_batches: list[int] = field(default_factory=lambda: [1])
    nocache_tokens: int = 8
    image_size: tuple[int, int] | None = None  # (height, width) where the base takes any size (`bench.bases`)


@dataclass
class BenchContext:
    """Both models on the same weights, the main inputs (`[batch_size, prompt]`), the settings, the device, and
    ours' per-call sparsity. "ours" runs with `sparsity`, "off" is ours with `SPARSITY_OFF`, "stock" is stock."""

    model: PreTrainedModel
    stock: torch.nn.Module
    inputs: dict[str, torch.Tensor]
    settings: BenchSettings
    device: str
    sparsity: dict[str, Any]
    weights: dict[str, int] = field(init=False)
    artifacts: dict[str, Any] = field(
        default_factory=dict
    )  # what one measure hands to a later one (a sequence, the floor's prompts)

    def __post_init__(self) -> None:
        self.weights = {"ours": weight_bytes(self.model), "stock": weight_bytes(self.stock)}
        self.weights["off"] = self.weights["ours"]

    @property
    def cuda(self) -> bool:
        return torch.device(self.device).type == "cuda"

    @property
    def prompt_tokens(self) -> int:
        return int(self.inputs["input_ids"].shape[1])

    def model_of(self, which: str) -> torch.nn.Module:
        return self.stock if which == "stock" else self.model

    def kwargs_of(self, which: str) -> dict[str, Any]:
        """The per-call sparsity of a side: ours' request, `SPARSITY_OFF`, or none (stock)."""
        return {"ours": self.sparsity, "off": SPARSITY_OFF, "stock": {}}[which]

    def inputs_at(self, batch: int, seed_offset: int) -> dict[str, torch.Tensor]:
        """Prompts of `batch` rows (ragged if set), seeded `seed + seed_offset`; the main inputs at offset 0."""
        if batch == self.settings.batch_size and seed_offset == 0:
            return self.inputs
        return bench_inputs(
            self.model, batch, self.settings.seed + seed_offset, self.settings.ragged, self.settings.image_size
        )

    def gen(self, which: str, inputs: dict[str, torch.Tensor], n: int, **extra: Any) -> Callable[[], Any]:
        """A call of one side's `generate()` of exactly `n` tokens (sampling reseeded each call, no grad)."""

        def run() -> Any:
            torch.manual_seed(self.settings.seed)
            with torch.no_grad():
                return generate(self.model_of(which), inputs, n, **self.kwargs_of(which), **extra)

        return run

    def record_memory(self, memory: dict[str, Any], run: str, which: str, record: dict[str, Any]) -> None:
        """`memory[run][which] = record` + its `footprint_bytes` (own weights + the peak's growth)."""
        memory.setdefault(run, {})[which] = dict(record, footprint_bytes=footprint_bytes(record, self.weights[which]))
