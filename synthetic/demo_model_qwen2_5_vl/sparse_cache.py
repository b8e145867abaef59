"""The KV caches of Dynamic-LLaVA: dense layers below `sparse_layer`, `SparseLayer` from it on.

As transformers' `cache_utils.py` does, a thin `Cache` holds per-layer storage objects and delegates to them layer by
layer (row selection, bytes, reset). Every sparse layer of a cache stores the same tokens in the same slots, so the
slot bookkeeping lives once, in a `SlotTable`; the per-row decisions live once, in a `RowLog`:

* each row's kept entries occupy slots `[0, lengths[row])`, left-aligned; storage is `batch x capacity`, never
  `batch x full length`;
* each slot is tagged with the original (RoPE) position of its token, `EMPTY` when it holds nothing, and remembers
  the column of its token in the whole sequence (what a 2D `attention_mask` indexes). The mask rule of
  `sparse_masks.visible_keys` (a query at position p sees a slot iff its tag <= p) reads only the tags; a call's
  `attention_mask` over the whole sequence hides the slots of the columns it masks (`SlotTable.visible_tags`), so a
  mask over past columns is honoured by every layer of every cache.

Protocol (one hand-over per forward): after scoring at `sparse_layer`, the model calls `cache.admit(SparseChunk)`
with what this chunk computes and keeps; the cache places the chunk's tokens in their slots (device-side write index,
no host sync), records the decisions, and returns the key positions the sparse layers' mask is built from. Each
`SparseLayer.update()` then writes its keys/values in place at those slots and returns its storage.

Rows that stop while `generate()` runs (an end token, a stop string, any stopping criterion: `RowLog.stopped`, set
by the model's stopping-criteria hook) change nothing from there on: the token a row is fed right after it stopped
is its last one; its keys/values are written but held back ("pending") until the next call, which keeps it if its
`attention_mask` shows that column (as the row alone would be fed it on its next turn) and drops it otherwise.

Capacity grows in blocks of `block_size` slots. The host keeps an upper bound of the used width; only when that
bound would pass the capacity does the cache read the real longest row (one host sync per block of decode steps)
and compact or grow. Attention reads the allocated capacity; empty slots are tagged `EMPTY`, so they are masked.

`DynamicLlavaStaticCache` preallocates everything (static shapes, no host sync at all while decoding, compilable).

`get_seq_length()` is the logical (full) length, so `generate()` positions stay right; physical sizes are reported
by `kept_lengths()`, `stored_bytes()` and `allocated_bytes()`.

The model recognizes these caches by declared class attributes (`is_dynamic_llava_cache`, `is_preallocated`), not
by `isinstance`: a Hub folder's copy of this module and the installed package's are different classes.

This file is a Hub remote-code module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .sparse_masks import EMPTY, tags
from .sparse_settings import sparsity_enabled
from .transformers_compat import cache_from_output, query_length

__all__ = [
    "cache_from_output",
    "DenseLayer",
    "DynamicLlavaCache",
    "DynamicLlavaStaticCache",
    "RowLog",
    "SlotTable",
    "SparseChunk",
    "SparseLayer",
    "StaticDenseLayer",
]

CROP_REFUSAL = (
    "DynamicLlavaCache cannot be cropped: its sparse layers dropped entries, so a shorter prefix of the history "
    "cannot be rebuilt. Assisted decoding, prompt lookup and DoLa need cropping and are not supported by "
    "Dynamic-LLaVA; generate without them."
)


@dataclass
class SparseChunk:
    """
    What the model hands the cache once per forward, after scoring at `sparse_layer`.

    token_valid: `[batch, q]` bool, the real tokens of this call (not padding). Dense layers store every column;
        this counts what a row really holds.
    positions: `[batch, c]` long, positions of the tokens the sparse layers compute (after dropping).
    valid: `[batch, c]` bool, which of those are real (not filler of a shorter row, not padding).
    store: `[batch, c]` bool, which of those enter the sparse layers' cache (a subset of `valid`).
    num_new_tokens: q, the logical length of this call.
    kept_vision_indices: per row, one LongTensor per image of this call (kept indices inside the image); None when
        the call has no image.
    output_text_keep: `[batch, n]` bool decisions of the generated tokens scored in this call, or None.
    output_text_scored: `[batch, n]` bool, which of those were real tokens of a live row.
    is_prompt: the call holds prompt text only (a new turn): rows stopped earlier are live again.
    columns: `[batch, c]` long, the column of each computed token in the whole sequence (what `attention_mask`
        indexes); None: the tokens are this call's columns in order (nothing dropped).
    attention_mask: `[batch, >= past + q]` 2D mask over the whole sequence (1 = real), or None (every column real).
    """

    token_valid: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor
    store: torch.Tensor
    num_new_tokens: int
    kept_vision_indices: list | None = None
    output_text_keep: torch.Tensor | None = None
    output_text_scored: torch.Tensor | None = None
    is_prompt: bool = True
    columns: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None


def _ranks_in_groups(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """
    `[batch, c]` long: each entry's rank when a row is ordered as (entries of `first`, in order), then (entries of
    `second`), then the rest; `first` and `second` are disjoint `[batch, c]` bool masks.
    """
    n_first = first.sum(-1, keepdim=True)
    n_second = second.sum(-1, keepdim=True)
    rest = ~(first | second)
    return torch.where(
        first,
        first.cumsum(-1) - 1,
        torch.where(second, n_first + second.cumsum(-1) - 1, n_first + n_second + rest.cumsum(-1) - 1),
    )


def _grow(old: torch.Tensor | None, shape: tuple, fill: Any, dim: int, **like: Any) -> torch.Tensor:
    """A new tensor of `shape` filled with `fill`, with `old`'s leading entries along `dim` copied in."""
    new = torch.full(shape, fill, **like)
    if old is not None and old.numel():
        keep = min(old.shape[dim], shape[dim])
        new.narrow(dim, 0, keep).copy_(old.narrow(dim, 0, keep))
    return new


def _mark_static(*tensors: torch.Tensor | None) -> None:
    """Tell torch.compile these tensors keep their address (preallocated state written in place)."""
    if not torch.compiler.is_compiling():
        for tensor in tensors:
            if tensor is not None:
                torch._dynamo.mark_static_address(tensor)


def column_visibility(attention_mask: torch.Tensor | None, columns: torch.Tensor) -> torch.Tensor | None:
    """
    Args:
        attention_mask: `[batch, width]` 2D mask over the whole sequence (nonzero = real), or None.
        columns: `[batch, n]` long, columns (`< width` where it matters; others are clamped).
    Returns:
        `[batch, n]` bool, whether each column is real under the mask (None: no mask, every column is).
    """
    if attention_mask is None:
        return None
    mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask.bool()
    mask = mask.to(columns.device)
    return mask.gather(1, columns.clamp(max=mask.shape[1] - 1))


class SlotTable:
    """
    Slot bookkeeping shared by the sparse layers of one cache.

    positions: `[batch, capacity]` long, each slot's position tag (`EMPTY` if it holds nothing). Slots from
        `lengths[row]` on are empty, except that slot `lengths[row]` keeps the tag of a token a one-token call
        computed but dropped (or a row's pending last token) until the next call writes or settles it.
    columns: `[batch, capacity]` long, the column of each slot's token in the whole sequence.
    lengths: `[batch, 1]` long, entries stored per row (slots `[0, lengths[row])`). A row with a pending last token
        (`RowLog.pending`) holds it at slot `lengths[row]` and writes its later tokens one slot further.
    write_index: `[batch, c]` long, the slot of each token of the current call (set by `admit`).
    capacity: slots allocated per row (host int); used_bound: a host upper bound of the slots in use per row.
    """

    def __init__(self, block_size: int = 32, static_capacity: int | None = None):
        self.block_size = block_size
        self.static_capacity = static_capacity
        self.positions: torch.Tensor | None = None
        self.columns: torch.Tensor | None = None
        self.lengths: torch.Tensor | None = None
        self.write_index: torch.Tensor | None = None
        self.capacity = 0
        self.used_bound = 0
        self.logical_length = 0
        self.read_width = 0
        self.syncs = 0  # host syncs spent on compaction (tests count them)
        self._expanded: dict = {}

    @property
    def is_initialized(self) -> bool:
        return self.positions is not None

    def _in_use(self, pending: torch.Tensor | None) -> int:
        """The longest row's slots in use, its pending token included (one host sync)."""
        if not self.lengths.numel():
            return 0
        return int((self.lengths if pending is None else self.lengths + pending).max())

    def _ensure(self, batch: int, needed: int, device: torch.device, pending: torch.Tensor | None = None) -> None:
        """Make room for `needed` more slots per row (dynamic: one host sync when the bound would pass capacity)."""
        if self.positions is None:
            self.positions = torch.full((batch, 0), EMPTY, dtype=torch.long, device=device)
            self.columns = torch.zeros((batch, 0), dtype=torch.long, device=device)
            self.lengths = torch.zeros(batch, 1, dtype=torch.long, device=device)
        if self.static_capacity is not None:  # fixed: the dense columns overflow first (a clear error there)
            if self.capacity == 0:
                self._resize(self.static_capacity)
            return
        if self.used_bound + needed <= self.capacity:
            return
        if self.capacity:  # (a fresh table knows its bound exactly: no sync)
            self.syncs += 1
            self.used_bound = self._in_use(pending)
        # at least a block of headroom after every read, so the next read is a block of steps away
        if self.used_bound + needed + self.block_size > self.capacity:
            self._resize(self.used_bound + needed + self.block_size)

    def _resize(self, capacity: int) -> None:
        batch = self.positions.shape[0]
        device = self.positions.device
        self.positions = _grow(self.positions, (batch, capacity), EMPTY, 1, dtype=torch.long, device=device)
        self.columns = _grow(self.columns, (batch, capacity), 0, 1, dtype=torch.long, device=device)
        self.capacity = capacity
        if self.static_capacity is not None:
            _mark_static(self.positions, self.columns, self.lengths)

    def settle(self, kept: torch.Tensor, pending: torch.Tensor) -> None:
        """
        Keep or drop each row's pending last token (at slot `lengths[row]`).

        Args:
            kept: `[batch, 1]` long, 1 where the pending token is kept (stored, its tag stays).
            pending: `[batch, 1]` long, 1 where a row holds a pending token (the others are not touched).
        """
        if self.positions is None:
            return
        slot = self.lengths.clamp(max=max(self.capacity - 1, 0))
        current = self.positions.gather(1, slot)
        self.positions.scatter_(1, slot, torch.where(pending.bool() & ~kept.bool(), EMPTY, current))
        self.lengths += kept

    def admit(
        self,
        positions: torch.Tensor,
        columns: torch.Tensor,
        valid: torch.Tensor,
        store: torch.Tensor,
        num_new_tokens: int,
        pending: torch.Tensor | None = None,
        plainly_causal: bool = False,
    ) -> torch.Tensor:
        """
        Place a computed chunk: stored tokens at `lengths[row] + rank` (left-aligned, in order), the others after
        them. Stored tokens keep their tags; a valid token that is not stored is tagged for this call's mask only
        (it sees itself); filler and padding are never tagged.

        Args:
            positions, columns, valid, store: `[batch, c]` (see `SparseChunk`).
            num_new_tokens: the logical length of the call (before dropping).
            pending: `[batch, 1]` long for a one-token call: 1 for rows holding a pending token (their token goes
                one slot further), or None.
            plainly_causal: the caller checked that keys == queries in order (first prefill, every row computes
                the same tokens): attention may then read only the first `c` slots, without a mask.
        Returns:
            `[batch, width]` long key positions for this call's mask (before the whole-sequence mask).
        """
        batch, c = positions.shape
        self._ensure(batch, c, positions.device, pending)
        if c == 1:
            # decode: each row writes slot lengths[row] (a row with a pending token the slot after it), tagged for
            # this call even if dropped; the next call writes that slot first, so a dropped token's tag does not
            # outlive its call (no second write needed)
            dest = self.lengths if pending is None else self.lengths + pending
            self.positions.scatter_(1, dest, tags(positions, valid))
            self.columns.scatter_(1, dest, columns)
            key_positions = self.positions
            if self.static_capacity is None:
                self.lengths = self.lengths + store  # (out of place: `dest` keeps this call's slots)
            else:
                dest = dest.clone() if pending is None else dest
                self.lengths += store  # (in place: a static address)
        else:  # stored tokens first (in order), then computed-but-dropped ones, then filler/padding
            dest = self.lengths + _ranks_in_groups(store, valid & ~store)
            key_positions = self.positions.scatter(1, dest, tags(positions, valid))
            self.positions.scatter_(1, dest, tags(positions, store))
            self.columns.scatter_(1, dest, columns)
            self.lengths += store.sum(-1, keepdim=True)
        if self.static_capacity is None:  # (a static table keeps no host counters: nothing to retrace per step)
            self.used_bound += c
            self.logical_length += num_new_tokens
        self.write_index = dest
        self._expanded = {}
        # what attention reads: a decode step the whole capacity (no slicing op per layer, empty slots are masked);
        # a multi-token chunk only the slots that can be in use (no compute on a block of empty slots)
        if plainly_causal:
            self.read_width = c
        elif c == 1 or self.static_capacity is not None:
            self.read_width = self.capacity
        else:
            self.read_width = min(self.used_bound, self.capacity)
        return key_positions if self.read_width == self.capacity else key_positions[:, : self.read_width]

    def visible_tags(self, key_positions: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """`key_positions` `[batch, width]` with the slots of the columns `attention_mask` masks set to `EMPTY`."""
        shown = column_visibility(attention_mask, self.columns[:, : key_positions.shape[1]])
        return key_positions if shown is None else torch.where(shown, key_positions, EMPTY)

    def expanded_index(self, like: torch.Tensor) -> torch.Tensor:
        """`write_index` as a scatter index shaped like `like` (`[batch, heads, c, dim]`), shared by the layers."""
        key = (like.shape[1], like.shape[-1], like.device)
        index = self._expanded.get(key)
        if index is None:
            batch, c = self.write_index.shape
            index = self.write_index.to(like.device).view(batch, 1, c, 1).expand(-1, like.shape[1], -1, like.shape[-1])
            self._expanded[key] = index
        return index

    def select_rows(self, index: torch.Tensor, pending: torch.Tensor | None = None) -> None:
        """
        Keep rows `index` (beam reorder, batch selection, expansion); storage shrinks to the new longest row.
        `pending`: the new rows' `[batch, 1]` pending flags (their pending slots are kept too).
        """
        if self.positions is None:
            return
        for name in ("positions", "columns", "lengths"):
            tensor = getattr(self, name)
            setattr(self, name, tensor.index_select(0, index.to(tensor.device)))
        self.write_index = None
        self._expanded = {}
        if self.static_capacity is not None:
            _mark_static(self.positions, self.columns, self.lengths)
            return
        self.syncs += 1
        self.used_bound = self._in_use(pending)
        capacity = self.used_bound + self.block_size
        if capacity < self.capacity:
            self.positions = self.positions[:, :capacity].contiguous()
            self.columns = self.columns[:, :capacity].contiguous()
            self.capacity = capacity

    def reset(self) -> None:
        self.__init__(self.block_size, self.static_capacity)


# ---- the per-layer storage -------------------------------------------------------------------------------------------


class _LayerStorage:
    """What every layer of a Dynamic-LLaVA cache offers its cache: row selection, the width in use, bytes, reset."""

    is_sparse = False

    def select_rows(self, index: torch.Tensor) -> None:
        if self.is_initialized and self.keys is not None:
            self.keys = self.keys.index_select(0, index.to(self.keys.device))
            self.values = self.values.index_select(0, index.to(self.values.device))

    def bytes_per_token(self) -> int:
        """Bytes of one token's keys and values in this layer (0 before the first write)."""
        if not self.is_initialized or self.keys is None:
            return 0
        keys, values = self.keys, self.values
        return keys.shape[1] * keys.shape[-1] * keys.element_size() + values.shape[1] * values.shape[-1] * (
            values.element_size()
        )

    def rows(self) -> int:
        return 0 if not self.is_initialized or self.keys is None else self.keys.shape[0]

    def stored_width(self) -> int:
        """Entries per row in use (the allocated width for a growing dense layer)."""
        return 0 if not self.is_initialized or self.keys is None else self.keys.shape[-2]

    def stored_bytes(self) -> int:
        return self.rows() * self.stored_width() * self.bytes_per_token()

    def allocated_bytes(self) -> int:
        if not self.is_initialized or self.keys is None:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    def dense_bytes(self, length: int) -> int:
        """Bytes a stock dense layer would hold for `length` tokens per row."""
        return self.rows() * length * self.bytes_per_token()

    def reset(self) -> None:
        """Empty the layer (4.57's DynamicLayer.reset only zeroes in place)."""
        self.keys = self.values = None
        self.is_initialized = False

    def crop(self, *args: Any, **kwargs: Any) -> None:
        raise ValueError(CROP_REFUSAL)


class DenseLayer(_LayerStorage, DynamicLayer):
    """A stock growing dense layer (every column, padding included), with the storage interface of its cache."""

    is_sliding = False
    is_croppable = False


class SparseLayer(_LayerStorage, DynamicLayer):
    """
    A cache layer that stores only the kept entries of each row, in place.

    Storage:
        keys, values: `[batch, kv_heads, capacity, head_dim]`; row `b` holds its entries in slots `[0, lengths[b])`
        of the shared `SlotTable` (which also holds each slot's position tag and column).
    """

    is_sliding = False
    is_croppable = False
    is_sparse = True

    def __init__(self, table: SlotTable | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.table = table if table is not None else SlotTable()

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None) -> None:
        value_states = key_states if value_states is None else value_states
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_zeros((*key_states.shape[:2], 0, key_states.shape[-1]))
        self.values = value_states.new_zeros((*value_states.shape[:2], 0, value_states.shape[-1]))
        self.is_initialized = True

    def _fit(self) -> None:
        """Follow the table's capacity and batch (growth, compaction, row selection)."""
        capacity = self.table.capacity
        if self.keys.shape[-2] == capacity:
            return
        like = {"dtype": self.keys.dtype, "device": self.keys.device}
        self.keys = _grow(self.keys, (*self.keys.shape[:2], capacity, self.keys.shape[-1]), 0, 2, **like)
        self.values = _grow(self.values, (*self.values.shape[:2], capacity, self.values.shape[-1]), 0, 2, **like)
        if self.table.static_capacity is not None:
            _mark_static(self.keys, self.values)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        """
        Args:
            key_states, value_states: `[batch, kv_heads, c, head_dim]`, the chunk the model computes in this layer.
        Returns:
            `(keys, values)` of shape `[batch, kv_heads, width, head_dim]`: this layer's storage with the chunk
            written in (width = the allocated capacity, or `c` for a plainly causal first prefill). The key order is
            the slot order of `SlotTable.admit`'s key positions.
        """
        if self.table.write_index is None:
            raise RuntimeError(
                "SparseLayer.update() was called without a chunk admitted by the cache. DynamicLlavaCache is driven by "
                "a Dynamic-LLaVA model; other models should use a plain DynamicCache."
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._fit()
        self.keys.scatter_(2, self.table.expanded_index(key_states), key_states)
        self.values.scatter_(2, self.table.expanded_index(value_states), value_states)
        width = self.table.read_width
        if width == self.keys.shape[-2]:
            return self.keys, self.values
        return self.keys[:, :, :width], self.values[:, :, :width]

    def select_rows(self, index: torch.Tensor) -> None:
        super().select_rows(index)
        if self.is_initialized:
            self._fit()

    def stored_width(self) -> int:
        """The longest kept row (one host sync)."""
        lengths = self.table.lengths
        return int(lengths.max()) if lengths is not None and lengths.numel() and self.is_initialized else 0

    def kept_length(self) -> torch.Tensor:
        """`[batch]` long: entries stored per row."""
        if self.table.lengths is None:
            return torch.zeros(0, dtype=torch.long)
        return self.table.lengths.view(-1)

    def get_seq_length(self) -> int:
        """The logical length: every token this layer was shown, kept or not (dynamic tables)."""
        return self.table.logical_length

    def get_mask_sizes(self, query: Any, *args: Any) -> tuple[int, int]:
        return self.table.read_width + query_length(query), 0

    def get_max_cache_shape(self) -> int:
        return -1 if self.table.static_capacity is None else self.table.static_capacity

    def get_max_length(self) -> int:
        return self.get_max_cache_shape()


class StaticDenseLayer(_LayerStorage, DynamicLayer):
    """
    A preallocated dense layer for `DynamicLlavaStaticCache`: every column (padding included) at a device-side
    column counter, written in place; the position tags of its columns live in the cache's `dense_positions`.

    keys, values: `[batch, kv_heads, max_cache_len, head_dim]`.
    """

    is_sliding = False
    is_croppable = False
    is_compileable = True

    def __init__(self, cache: DynamicLlavaStaticCache, **kwargs: Any):
        super().__init__(**kwargs)
        self.cache = cache

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None) -> None:
        value_states = key_states if value_states is None else value_states
        length = self.cache.max_cache_len
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_zeros((*key_states.shape[:2], length, key_states.shape[-1]))
        self.values = value_states.new_zeros((*value_states.shape[:2], length, value_states.shape[-1]))
        _mark_static(self.keys, self.values)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        """Write the chunk `[batch, kv_heads, q, head_dim]` at this call's columns; return the whole storage."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        columns = self.cache.dense_columns
        self.keys.index_copy_(2, columns, key_states)
        self.values.index_copy_(2, columns, value_states)
        return self.keys, self.values

    def stored_width(self) -> int:
        return self.cache.get_seq_length() if self.is_initialized else 0

    def get_seq_length(self) -> int:
        return self.cache.get_seq_length()

    def get_mask_sizes(self, query: Any, *args: Any) -> tuple[int, int]:
        return self.cache.max_cache_len, 0

    def get_max_cache_shape(self) -> int:
        return self.cache.max_cache_len

    def get_max_length(self) -> int:
        return self.cache.max_cache_len


# ---- the per-row decisions -------------------------------------------------------------------------------------------


class RowLog:
    """
    The per-row decisions of one cache, for introspection (one object, one row-selection path).

    real_tokens: `[batch, 1]` long, real tokens each row was shown (what its dense layers really hold).
    live: `[batch]` bool, False once the row stopped in the current `generate()` call (it is only padded from there).
    stopped: `[batch]` bool, written by the model's stopping-criteria hook after each step of `generate()`: the rows
        that stopped so far in this call (the next token each is fed is its last).
    pending: `[batch, 1]` long, 1 for a row whose last token (fed right after it stopped) is held back until the next
        call keeps it (if that call's `attention_mask` shows its column, `pending_column`) or drops it.
    vision: per row, one LongTensor per image (kept indices inside the image, ascending).
    output-text decisions: per call, `keep` `[batch, n]` and `scored` `[batch, n]` (which were real tokens of a live
        row), appended as they come (no device work per step) and gathered per row when asked; a static cache writes
        them into a preallocated `[batch, slots]` buffer instead (no Python state changes inside a compiled step).
    """

    def __init__(self, block_size: int = 32, static_slots: int | None = None):
        self.block_size = block_size
        self.static_slots = static_slots
        self.real_tokens: torch.Tensor | None = None
        self.live: torch.Tensor | None = None
        self.stopped: torch.Tensor | None = None
        self.pending: torch.Tensor | None = None
        self.pending_column: torch.Tensor | None = None
        self.settle_next = False  # host flag: settle the pending tokens at the next call (set when generate() ends)
        self.write_offset: torch.Tensor | None = None  # [batch, 1] long: this decode step's slot offset per row
        self.row_state: dict[str, torch.Tensor] = {}  # a base's own per-row state (Qwen2.5-VL: its M-RoPE offsets)
        self.vision: list[list[torch.Tensor]] = []
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.decisions: torch.Tensor | None = None  # static: [batch, slots] bool
        self.decision_counts: torch.Tensor | None = None  # static: [batch] long

    def _init(self, batch: int, device: torch.device) -> None:
        self.real_tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.live = torch.ones(batch, dtype=torch.bool, device=device)
        self.stopped = torch.zeros(batch, dtype=torch.bool, device=device)
        self.pending = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pending_column = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.vision = [[] for _ in range(batch)]
        if self.static_slots is not None:
            self.decisions = torch.zeros(batch, self.static_slots, dtype=torch.bool, device=device)
            self.decision_counts = torch.zeros(batch, dtype=torch.long, device=device)
            _mark_static(
                self.real_tokens, self.live, self.stopped, self.pending, self.pending_column, self.decision_counts
            )
            _mark_static(self.decisions)

    def record_stops(self, is_done: torch.Tensor) -> None:
        """`[batch]` bool, the rows a stopping criterion ended at this step of `generate()` (accumulated)."""
        if self.stopped is not None and is_done.shape == self.stopped.shape:
            self.stopped |= is_done.to(self.stopped.device)

    def begin_generation(self) -> None:
        """A new `generate()` call: no row has stopped in it yet."""
        if self.stopped is not None:
            self.stopped.zero_()

    def settle(self, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """
        Keep each row's pending last token iff `attention_mask` (`[batch, width]` over the whole sequence, or None:
        every column real) shows its column; count the kept ones. Returns `(kept, pending)` `[batch, 1]` long (for
        the slot table), or None when there was nothing to settle.
        """
        if self.real_tokens is None:
            return None
        pending = self.pending.clone()
        shown = column_visibility(attention_mask, self.pending_column)
        kept = pending if shown is None else pending * shown.long()
        self.real_tokens += kept
        self.pending.zero_()
        self.settle_next = False
        return kept, pending

    def step(self, chunk: SparseChunk, columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        The rows this call may change, and those it finishes (`columns`: `[batch, c]` of the computed tokens).

        Returns:
            `live` `[batch]` bool (rows this call changes), and for a decode step `[batch, 1]` bool `finishing`
            (rows fed their last token: stopped at the previous step, live until now; it becomes pending), else None.
        """
        if self.real_tokens is None:
            self._init(chunk.token_valid.shape[0], chunk.token_valid.device)
        if chunk.is_prompt:
            self.live.fill_(True)
            return self.live, None
        if chunk.token_valid.shape[1] != 1:
            return self.live, None
        finishing = self.live & self.stopped
        self.live ^= finishing  # (live and stopped -> not live)
        finishing = finishing.view(-1, 1)
        self.write_offset = self.pending.clone()  # (a finishing row writes its last token at its pending slot)
        self.pending.bitwise_or_(finishing)  # (long |= bool: 1 where the row finishes)
        self.pending_column.copy_(torch.where(finishing, columns.to(self.pending_column.device), self.pending_column))
        return self.live, finishing

    def record(self, chunk: SparseChunk, real: torch.Tensor, live: torch.Tensor) -> None:
        """`real`: `[batch, q]` the call's real tokens of live rows; `live`: `[batch]` (see `step`)."""
        batch, q = real.shape
        self.real_tokens += real if q == 1 else real.sum(-1, keepdim=True)
        if chunk.kept_vision_indices is not None:
            for row, images in zip(self.vision, chunk.kept_vision_indices, strict=True):
                row.extend(images)
        if chunk.output_text_keep is None:
            return
        keep = chunk.output_text_keep
        scored = real if q == 1 else chunk.output_text_scored & live[:, None]
        if self.static_slots is None:
            self.calls.append((keep, scored))
            return
        n = keep.shape[1]
        if n == 1:
            dest = self.decision_counts.view(batch, 1).clone()
        else:
            dest = self.decision_counts[:, None] + _ranks_in_groups(scored, torch.zeros_like(scored))
        self.decisions.scatter_(1, dest, keep.to(self.decisions.device))
        self.decision_counts += scored.sum(-1)

    def _gather_calls(self) -> None:
        """Fold the calls logged so far into one `[batch, n]` pair (before a row selection or a read)."""
        if len(self.calls) > 1:
            keep = torch.cat([k.to(self.calls[0][0].device) for k, _ in self.calls], dim=1)
            scored = torch.cat([s.to(self.calls[0][1].device) for _, s in self.calls], dim=1)
            self.calls = [(keep, scored)]

    def select_rows(self, index: torch.Tensor) -> None:
        if self.real_tokens is None:
            return
        names = ["real_tokens", "live", "stopped", "pending", "pending_column"]
        names += ["decisions", "decision_counts"] if self.static_slots else []
        for name in names:
            tensor = getattr(self, name)
            setattr(self, name, tensor.index_select(0, index.to(tensor.device)))
        self.row_state = {k: v.index_select(0, index.to(v.device)) for k, v in self.row_state.items()}
        self._gather_calls()
        self.calls = [
            (k.index_select(0, index.to(k.device)), s.index_select(0, index.to(s.device))) for k, s in self.calls
        ]
        self.vision = [list(self.vision[i]) for i in index.tolist()]

    def output_text_keep(self) -> list[torch.Tensor]:
        """Per row, one bool per generated token it was fed while live."""
        if self.real_tokens is None:
            return []
        if self.static_slots is not None:
            counts = self.decision_counts.tolist()
            return [self.decisions[b, :n].clone() for b, n in enumerate(counts)]
        batch = self.real_tokens.shape[0]
        if not self.calls:
            return [torch.zeros(0, dtype=torch.bool) for _ in range(batch)]
        self._gather_calls()
        keep, scored = self.calls[0]
        return [keep[b][scored[b]] for b in range(batch)]

    def reset(self) -> None:
        self.__init__(self.block_size, self.static_slots)


# ---- the caches ------------------------------------------------------------------------------------------------------


class DynamicLlavaCache(Cache):
    """
    The cache a Dynamic-LLaVA model's `generate()` builds by itself: dense layers for layers `< sparse_layer`,
    `SparseLayer` from it on (all dense when sparsification is off), growing as it goes.

    Introspection (all per row of the batch):
        kept_vision_indices: list per row of list per image of LongTensor (kept indices inside the image,
            ascending); an empty list for a row without image.
        output_text_keep: list per row of BoolTensor, one decision per generated token fed back.
        kept_lengths(): `[num_layers, batch]` entries physically stored per layer and row (padding never counted).
        stored_bytes() (used), allocated_bytes() (allocated, capacity blocks included), dense_bytes().
    """

    # what the model checks (declared, so it holds across the installed module and a Hub folder's copy of it)
    is_dynamic_llava_cache = True
    is_preallocated = False
    is_compileable = False

    def __init__(
        self,
        config: Any = None,
        *,
        num_hidden_layers: int | None = None,
        sparse_layer: int | None = None,
        block_size: int = 32,
    ):
        if config is not None:
            text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
            num_hidden_layers = text_config.num_hidden_layers
            if sparse_layer is None:
                enabled = sparsity_enabled(
                    getattr(config, "use_vision_predictor", True), getattr(config, "use_output_text_predictor", True)
                )
                sparse_layer = config.sparse_layer if enabled else num_hidden_layers
        if num_hidden_layers is None or sparse_layer is None:
            raise ValueError("DynamicLlavaCache needs the model config (or num_hidden_layers and sparse_layer).")
        if not 1 <= sparse_layer <= num_hidden_layers:
            raise ValueError(
                f"sparse_layer={sparse_layer} must lie in 1..{num_hidden_layers} ({num_hidden_layers} = all dense)."
            )
        self.sparse_layer = sparse_layer
        self.num_hidden_layers = num_hidden_layers
        self.table = self._make_table(block_size)
        self.log = self._make_log(block_size)
        layers = [self._dense_layer() for _ in range(sparse_layer)]
        layers += [SparseLayer(self.table) for _ in range(sparse_layer, num_hidden_layers)]
        super().__init__(layers=layers)
        self.is_empty = True
        # set when beam search filled it: its rows are the running beams, not the returned sequences
        self.filled_by_beam_search = False

    # ---- construction hooks (the static cache overrides them) ----------------------------------------------------

    def _make_table(self, block_size: int) -> SlotTable:
        return SlotTable(block_size)

    def _make_log(self, block_size: int) -> RowLog:
        return RowLog(block_size)

    def _dense_layer(self) -> DynamicLayer:
        return DenseLayer()

    # ---- driven by the model -----------------------------------------------------------------------------------

    @property
    def sparse_layers(self) -> list[SparseLayer]:
        return self.layers[self.sparse_layer :]

    @property
    def is_sparse(self) -> bool:
        """True when some layers are sparse (False: an all-dense cache, sparsification off)."""
        return self.sparse_layer < self.num_hidden_layers

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Logical length (layer 0 is dense): what `generate()` uses for positions."""
        return self.layers[layer_idx].get_seq_length()

    def admit(self, chunk: SparseChunk, plainly_causal: bool = False) -> torch.Tensor | None:
        """
        The one hand-over per forward (see the module docstring). Rows that stopped change nothing.

        Returns:
            `[batch, width]` long key positions of the sparse layers, with the columns `chunk.attention_mask` masks
            hidden (None for an all-dense cache).
        """
        columns = chunk.columns
        if columns is None:
            start = self.table.logical_length if not self.is_preallocated else self.length
            columns = (torch.arange(chunk.positions.shape[1], device=chunk.positions.device) + start).expand_as(
                chunk.positions
            )
        if chunk.is_prompt or self.log.settle_next:
            settled = self.log.settle(chunk.attention_mask)
            if settled is not None and self.is_sparse:
                self.table.settle(*settled)
        live, finishing = self.log.step(chunk, columns)
        real = chunk.token_valid & live.view(-1, 1)
        self.log.record(chunk, real, live)
        self.is_empty = False
        if not self.is_sparse:
            return None
        # (a decode step computes the whole chunk: the computed tokens are the call's tokens; a finishing row's last
        # token computes and is written, pending)
        if finishing is not None:
            valid = chunk.token_valid & (live.view(-1, 1) | finishing)
        elif chunk.valid is chunk.token_valid:
            valid = real
        else:
            valid = chunk.valid & live.view(-1, 1)
        key_positions = self.table.admit(
            chunk.positions,
            columns,
            valid,
            chunk.store & real if finishing is not None else chunk.store & valid,
            chunk.num_new_tokens,
            pending=self.log.write_offset if finishing is not None else None,
            plainly_causal=plainly_causal,
        )
        return self.table.visible_tags(key_positions, chunk.attention_mask)

    def row_state(self, name: str) -> torch.Tensor | None:
        """A base's per-row state kept with the rows (`[batch, ...]`), or None if never set."""
        return self.log.row_state.get(name)

    def set_row_state(self, name: str, value: torch.Tensor) -> None:
        """Keep `value` (`[batch, ...]`) with the rows: reordered, repeated and selected with them."""
        if self.is_preallocated:
            _mark_static(value)
        self.log.row_state[name] = value

    def begin_generation(self) -> None:
        """`generate()` starts a call on this cache (its stopping-criteria hook records the rows that stop)."""
        self.log.begin_generation()

    def end_generation(self) -> None:
        """`generate()` returned: rows that stopped are live for whatever call comes next, which settles their
        pending last tokens."""
        if self.log.live is not None:
            self.log.live.fill_(True)
            self.log.settle_next = True

    # ---- introspection -----------------------------------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        return 0 if self.log.real_tokens is None else self.log.real_tokens.shape[0]

    @property
    def kept_vision_indices(self) -> list[list[torch.Tensor]]:
        return [list(images) for images in self.log.vision]

    @property
    def output_text_keep(self) -> list[torch.Tensor]:
        return self.log.output_text_keep()

    def stored_positions(self) -> list[torch.Tensor]:
        """Per row, the positions of the entries its sparse layers hold, ascending (one host sync)."""
        if self.table.lengths is None:
            return [torch.zeros(0, dtype=torch.long) for _ in range(self.batch_size)]
        lengths = self.table.lengths.view(-1).tolist()
        return [self.table.positions[b, :n].clone() for b, n in enumerate(lengths)]

    def kept_lengths(self) -> torch.Tensor:
        """`[num_layers, batch]` long: entries physically stored per layer and row, padding never counted."""
        if self.log.real_tokens is None:
            return torch.zeros(len(self.layers), 0, dtype=torch.long)
        dense = self.log.real_tokens.view(-1).cpu()
        sparse = self.table.lengths.view(-1).cpu() if self.table.lengths is not None else dense
        return torch.stack([sparse if layer.is_sparse else dense for layer in self.layers])

    def stored_bytes(self) -> int:
        """Bytes of the entries in use: dense layers `batch x length`, sparse layers `batch x longest kept row`."""
        return sum(layer.stored_bytes() for layer in self.layers)

    def allocated_bytes(self) -> int:
        """Bytes of key/value tensors actually allocated (capacity blocks and preallocation included)."""
        return sum(layer.allocated_bytes() for layer in self.layers)

    def dense_bytes(self) -> int:
        """Bytes a stock `DynamicCache` would hold for the same inputs (every layer x batch x full length)."""
        length = self.get_seq_length()
        return sum(layer.dense_bytes(length) for layer in self.layers)

    def sparsity_report(self) -> dict:
        """
        What the cache holds, for any call: per row the vision tokens kept and the generated tokens kept, and bytes.
        `kv_bytes_ratio` = stored_bytes / dense_bytes (dense = a stock DynamicCache for the same inputs).
        """
        decisions = self.output_text_keep
        kept_generated = [int(d.sum()) for d in decisions]
        generated = [int(d.numel()) for d in decisions]
        stored, allocated, dense = self.stored_bytes(), self.allocated_bytes(), self.dense_bytes()
        return {
            "sparse_layer": self.sparse_layer,
            "vision_tokens_kept": [[int(i.numel()) for i in images] for images in self.kept_vision_indices],
            "output_text_kept": kept_generated,
            "output_text_scored": generated,
            "output_text_keep_rate": (sum(kept_generated) / sum(generated)) if sum(generated) else None,
            "kept_lengths": self.kept_lengths().tolist(),
            "stored_bytes": stored,
            "allocated_bytes": allocated,
            "dense_bytes": dense,
            "kv_bytes_ratio": (stored / dense) if dense else None,
        }

    # ---- batch operations: one row-selection path for layers, slots and the log ----------------------------------

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep (and order, and repeat) rows by `index` `[new_batch]` long."""
        index = torch.as_tensor(index, dtype=torch.long)
        self.log.select_rows(index)
        self.table.select_rows(index, self.log.pending)
        for layer in self.layers:
            layer.select_rows(index)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.select_rows(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.select_rows(torch.arange(self.batch_size).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.select_rows(torch.arange(self.batch_size)[indices])

    def crop(self, *args: Any, **kwargs: Any) -> None:
        raise ValueError(CROP_REFUSAL)

    @property
    def is_croppable(self) -> bool:
        return False

    def reset(self) -> None:
        """Empty every layer and the bookkeeping."""
        for layer in self.layers:
            layer.reset()
        self.table.reset()
        self.log.reset()
        self.is_empty = True
        self.filled_by_beam_search = False


class DynamicLlavaStaticCache(DynamicLlavaCache):
    """
    A preallocated `DynamicLlavaCache` for compiled decoding: `generate(cache_implementation="static")` builds it.

    Dense layers hold `max_cache_len` columns; sparse layers `kept prompt + (max_cache_len - prompt)` slots (sized at
    the first call, when the kept prompt is known). Counters live on the device, writes are in place, shapes never
    change: a decode step has no host sync and `torch.compile(model.forward, fullgraph=True)` traces it once. Same
    tokens and decisions as `DynamicLlavaCache`.
    """

    is_preallocated = True
    is_compileable = True

    def __init__(self, config: Any = None, *, max_cache_len: int, **kwargs: Any):
        if max_cache_len < 1:
            raise ValueError(f"max_cache_len must be >= 1, got {max_cache_len}")
        self._max_cache_len = max_cache_len
        self.dense_positions: torch.Tensor | None = None
        self.dense_columns: torch.Tensor | None = None
        self.length: torch.Tensor | None = None
        super().__init__(config, **kwargs)

    @property
    def max_cache_len(self) -> int:
        """Columns of the dense layers (the sparse layers hold the kept prompt plus the rest of this budget)."""
        return self._max_cache_len

    def _make_table(self, block_size: int) -> SlotTable:
        return SlotTable(block_size, static_capacity=self.max_cache_len)

    def _make_log(self, block_size: int) -> RowLog:
        return RowLog(block_size, static_slots=self.max_cache_len)

    def _dense_layer(self) -> DynamicLayer:
        return StaticDenseLayer(self)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """The logical length (one host sync: call it between steps, not inside a compiled step)."""
        return 0 if self.length is None else int(self.length)

    def check_room(self, needed: int) -> None:
        """Raise a clear error when the dense columns cannot hold `needed` tokens in all (before anything runs)."""
        if needed > self.max_cache_len:
            used = self.get_seq_length()
            raise ValueError(
                f"DynamicLlavaStaticCache holds max_cache_len={self.max_cache_len} tokens per row, but this call needs "
                f"{needed} ({used} already in it): build it with DynamicLlavaStaticCache(model.config, "
                f"max_cache_len={needed}) or more, or ask for fewer new tokens."
            )

    def begin_dense(
        self, positions: torch.Tensor, token_valid: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """
        Place this call's `[batch, q]` tokens in the dense columns (before the dense layers run).

        Args:
            attention_mask: `[batch, >= past + q]` 2D mask over the whole sequence, or None: its masked columns are
                hidden from this call.
        Returns:
            `[batch, max_cache_len]` long key positions of the dense layers (`EMPTY`: padding, unused or masked).
        """
        batch, q = positions.shape
        if self.dense_positions is None:
            device = positions.device
            self.dense_positions = torch.full((batch, self.max_cache_len), EMPTY, dtype=torch.long, device=device)
            self.length = torch.zeros((), dtype=torch.long, device=device)
            _mark_static(self.dense_positions, self.length)
        if q > 1:  # (a decode step fits: generate() checked the room before it started)
            self.check_room(self.get_seq_length() + q)
        self.dense_columns = self.length + torch.arange(q, device=positions.device)
        self.dense_positions.index_copy_(1, self.dense_columns, tags(positions, token_valid))
        if attention_mask is None:
            return self.dense_positions
        width = min(attention_mask.shape[1], self.max_cache_len)
        columns = torch.arange(self.max_cache_len, device=positions.device).expand(batch, -1)
        shown = column_visibility(attention_mask[:, :width], columns) | (columns >= width)
        return torch.where(shown, self.dense_positions, EMPTY)

    def admit(self, chunk: SparseChunk, plainly_causal: bool = False) -> torch.Tensor | None:
        if self.is_empty and self.is_sparse:
            # sparse slots: the kept prompt plus what the remaining columns can add (known at the first call), plus
            # one for the slot a stopped row writes past its pending token
            self.table.static_capacity = self.max_cache_len - chunk.num_new_tokens + chunk.positions.shape[1] + 1
        key_positions = super().admit(chunk, plainly_causal=False)
        self.length += chunk.num_new_tokens
        return key_positions

    def select_rows(self, index: torch.Tensor) -> None:
        super().select_rows(index)
        if self.dense_positions is not None:
            self.dense_positions = self.dense_positions.index_select(0, index.to(self.dense_positions.device))

    def reset(self) -> None:
        super().reset()
        self.dense_positions = self.dense_columns = self.length = None
