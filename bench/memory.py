"""Memory of the bench: peak RSS (Linux `/proc`), peak accelerator memory (`torch.cuda.max_memory_allocated`), a
model's footprint in one run, and the largest batch that fits a budget.

Both models live in one process, so absolute peaks count both models' weights. A model's footprint in a run is what
it would need alone: its own weights (parameters and buffers) plus the growth of the peak over what was allocated
when the run started (on CUDA the allocator's peak; on the CPU the peak RSS, after handing freed heap back to the
system so that earlier runs' freed memory is not reused unseen).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "current_rss_bytes",
    "estimate_largest_batch",
    "footprint_bytes",
    "peak_memory",
    "peak_rss_bytes",
    "reset_peak_rss",
    "search_largest_batch",
    "weight_bytes",
]


def reset_peak_rss() -> bool:
    """Reset the process's peak RSS (Linux); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def peak_rss_bytes() -> int | None:
    """The process's peak RSS since the last reset (Linux), or None."""
    return _status_bytes("VmHWM:")


def current_rss_bytes() -> int | None:
    """The process's RSS now (Linux), or None."""
    return _status_bytes("VmRSS:")


def trim_heap() -> None:
    """Collect garbage and hand freed heap memory back to the system (glibc `malloc_trim`; elsewhere a no-op)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters and buffers."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def _is_cuda(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


@contextlib.contextmanager
def peak_memory(device: str | torch.device = "cpu") -> Iterator[dict[str, Any]]:
    """
    Measure the peaks of the block. Yields a dict filled on exit: `peak_rss_bytes` (absolute) and `rss_growth_bytes`
    (over the RSS at the start); on CUDA also `cuda_peak_bytes` (`max_memory_allocated`, reset at the start) and
    `cuda_growth_bytes` (over `memory_allocated` at the start). Values are None where not measurable.
    """
    record: dict[str, Any] = {}
    cuda = _is_cuda(device)
    trim_heap()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        cuda_start = torch.cuda.memory_allocated()
    rss_start = current_rss_bytes()
    resettable = reset_peak_rss()
    try:
        yield record
    finally:
        if cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            record.update(cuda_peak_bytes=peak, cuda_growth_bytes=peak - cuda_start)
        rss_peak = peak_rss_bytes() if resettable else None
        record.update(
            peak_rss_bytes=rss_peak,
            rss_growth_bytes=(rss_peak - rss_start) if rss_peak is not None and rss_start is not None else None,
        )


def footprint_bytes(record: dict[str, Any], weights: int) -> int | None:
    """A model's footprint in a run: its weights plus the growth of the run's peak (CUDA if measured, else RSS)."""
    growth = record.get("cuda_growth_bytes")
    if growth is None:
        growth = record.get("rss_growth_bytes")
    return None if growth is None else weights + growth


def search_largest_batch(
    footprint: Callable[[int], int | None], budget: int, start: int = 1, limit: int = 4096
) -> tuple[int, dict[int, int | None]]:
    """
    The largest batch whose `footprint(batch)` (bytes, or None: out of memory) is at most `budget`, assuming the
    footprint grows with the batch: from `start`, doubling while it fits (or halving while it does not), then
    bisection between the last batch that fits and the first that does not. Returns it (0: not even batch 1) and
    the probes `{batch: footprint}`.
    """
    probes: dict[int, int | None] = {}

    def fits(batch: int) -> bool:
        if batch not in probes:
            probes[batch] = footprint(batch)
        value = probes[batch]
        return value is not None and value <= budget

    start = max(1, min(start, limit))
    if fits(start):
        lo, hi = start, None
        while hi is None:
            if lo >= limit:
                return lo, probes
            batch = min(2 * lo, limit)
            if fits(batch):
                lo = batch
            else:
                hi = batch
    else:
        lo, hi = 0, start
        while lo == 0 and hi > 1:
            batch = hi // 2
            if fits(batch):
                lo = batch
            else:
                hi = batch
        if lo == 0:
            return 0, probes
    while hi - lo > 1:
        middle = (lo + hi) // 2
        if fits(middle):
            lo = middle
        else:
            hi = middle
    return lo, probes


def estimate_largest_batch(points: dict[int, int], budget: int) -> int | None:
    """
    The largest batch within `budget` by a line through the footprints measured at the smallest and the largest
    batch of `points` (`{batch: bytes}`); None when the points do not give a positive slope.
    """
    if len(points) < 2:
        return None
    (b1, f1), (b2, f2) = min(points.items()), max(points.items())
    slope = (f2 - f1) / (b2 - b1)
    if slope <= 0:
        return None
    base = f1 - slope * b1
    return max(0, int((budget - base) // slope))
