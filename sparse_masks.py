"""The one position-tag rule behind every mask of the sparse layers.

Every key a sparse layer attends to carries a tag: the original (RoPE) position of its token, or `-1` for an empty
slot (padding, a dropped token, unused capacity). A query at position `p` sees a key iff the key's tag is `>= 0` and
`<= p`. Because kept tokens keep their original positions, that one rule gives the causal mask of prefill, of each
decode step, of a chunk fed into an existing cache, of left-padded and ragged batches, and (with a keep mask on top)
of training.

This file is a Hub remote-code module.
"""

from __future__ import annotations

import torch

__all__ = ["attention_mask_for", "is_plainly_causal", "visible_keys"]


def visible_keys(
    key_positions: torch.Tensor, query_positions: torch.Tensor, query_valid: torch.Tensor | None = None
) -> torch.Tensor:
    """
    The position-tag rule.

    Args:
        key_positions: `[batch, keys]` long, each key's position, `-1` for an empty slot.
        query_positions: `[batch, q]` long, each query's position.
        query_valid: `[batch, q]` bool, False for filler and padding queries, or None (all valid). Such a query sees
            every slot, so its softmax stays finite; its output is never used.
    Returns:
        `[batch, 1, q, keys]` bool, True = the query attends to the key.
    """
    keys = key_positions[:, None, :]
    visible = (keys >= 0) & (keys <= query_positions[:, :, None])
    if query_valid is not None:
        visible = visible | ~query_valid[:, :, None]
    return visible[:, None]


def attention_mask_for(visible: torch.Tensor, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """
    `visible` (`[batch, 1, q, keys]` bool) in the form the attention function takes: sdpa a bool mask (True =
    attend), eager an additive float mask (a bool mask would be silently wrong there).
    """
    if attn_implementation == "sdpa":
        return visible
    if attn_implementation == "eager":
        return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(
            ~visible, torch.finfo(dtype).min
        )
    raise ValueError(
        f"attn_implementation={attn_implementation!r} is not supported by Dynamic-LLaVA's sparse layers; load the "
        "model with attn_implementation='sdpa' (default) or 'eager'."
    )


def is_plainly_causal(key_positions: torch.Tensor, query_positions: torch.Tensor) -> bool:
    """
    True when the rule reduces to a plain causal mask over the same tokens (keys are exactly the queries, in
    ascending order, no empty slot): attention can then run with `is_causal` and no mask, which lets sdpa pick its
    flash and memory-efficient kernels. One host sync; call it only where one is allowed (prefill).
    """
    if key_positions.shape != query_positions.shape:
        return False
    ascending = (query_positions[:, 1:] > query_positions[:, :-1]).all() if query_positions.shape[1] > 1 else True
    return bool(((key_positions == query_positions) & (key_positions >= 0)).all() & ascending)
