"""The one position-tag rule behind every mask of the sparse layers.

Every key a sparse layer attends to carries a tag: the original (RoPE) position of its token, or `EMPTY` (the
largest int64) for a slot that holds nothing (padding, a dropped token, unused capacity). A query at position `p`
sees a key iff the key's tag is `<= p`; an empty slot never is. Because kept tokens keep their original positions,
that one comparison gives the causal mask of prefill, of each decode step, of a chunk fed into an existing cache, of
left-padded and ragged batches, and (with a keep mask on top) of training.

This file is a Hub remote-code module.
"""

from __future__ import annotations

import torch

__all__ = ["EMPTY", "all_true", "attention_mask_for", "tags", "visible_keys"]

EMPTY = torch.iinfo(torch.long).max

_CONSTANTS: dict = {}


def _constant(value: float | int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A cached 0-d tensor (so a decode step does not create the same scalar again and again)."""
    key = (value, dtype, device)
    tensor = _CONSTANTS.get(key)
    if tensor is None:
        tensor = _CONSTANTS[key] = torch.tensor(value, dtype=dtype, device=device)
    return tensor


def all_true(batch: int, q: int, device: torch.device) -> torch.Tensor:
    """A cached `[batch, q]` bool tensor of True (a decode step without padding does not create it again); callers
    never write to it."""
    if q != 1:
        return torch.ones(batch, q, dtype=torch.bool, device=device)
    key = ("all_true", batch, device)
    tensor = _CONSTANTS.get(key)
    if tensor is None:
        tensor = _CONSTANTS[key] = torch.ones(batch, 1, dtype=torch.bool, device=device)
    return tensor


def tags(positions: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """`[batch, n]` position tags: `positions` where `real`, `EMPTY` elsewhere."""
    return torch.where(real, positions, _constant(EMPTY, torch.long, positions.device))


def visible_keys(
    key_positions: torch.Tensor, query_positions: torch.Tensor, query_valid: torch.Tensor | None = None
) -> torch.Tensor:
    """
    The position-tag rule.

    Args:
        key_positions: `[batch, keys]` long, each key's position tag (`EMPTY` for a slot that holds nothing).
        query_positions: `[batch, q]` long, each query's position.
        query_valid: `[batch, q]` bool, False for filler and padding queries, or None (all valid). Such a query sees
            every slot, so its softmax stays finite; its output is never used.
    Returns:
        `[batch, 1, q, keys]` bool, True = the query attends to the key.
    """
    batch, q = query_positions.shape
    visible = key_positions.view(batch, 1, 1, -1) <= query_positions.view(batch, 1, q, 1)
    if query_valid is not None:
        visible = visible | ~query_valid.view(batch, 1, q, 1)
    return visible


def attention_mask_for(visible: torch.Tensor, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """
    `visible` (`[batch, 1, q, keys]` bool) as the additive float mask both sdpa and eager take (0 = attend, the
    dtype's minimum = masked). Built once per forward and shared by all the layers it serves: handing sdpa a bool
    mask would make every layer convert it again, and eager needs a float mask (a bool one is silently wrong there).
    """
    if attn_implementation not in ("sdpa", "eager"):
        raise ValueError(
            f"attn_implementation={attn_implementation!r} is not supported by Dynamic-LLaVA's sparse layers; load the "
            "model with attn_implementation='sdpa' (default) or 'eager'."
        )
    device = visible.device
    return torch.where(visible, _constant(0.0, dtype, device), _constant(torch.finfo(dtype).min, dtype, device))
