"""The KV cache of Dynamic-LLaVA: stock dense layers below `sparse_layer`, `SparseLayer` from it on.

A `SparseLayer` stores only the entries the predictors kept. Each stored slot is tagged with the original (RoPE)
position of its token; `-1` marks an empty slot. Rows are filled left to right, so a row's kept entries are the
slots `[0, kept_length[row])` and storage is `batch x max kept`, never `batch x full length`. With that tag one
rule gives every attention mask: a query at position `p` may see a stored slot iff the slot is non-empty and
`slot_position <= p`. It covers prefill, decoding, chunks fed into an existing cache, left padding (padding is never
stored) and ragged batches.

The model tells the cache, before the sparse layers run, which tokens of the incoming chunk to store
(`DynamicLlavaCache.stage_sparse_chunk`); each sparse layer's `update()` then returns the stored past plus the whole
current chunk (what attention needs for this call) and keeps only the staged part. `get_seq_length()` stays the
logical (full) length, so `generate()` positions stay right; physical sizes are reported by `kept_lengths()` and
`stored_bytes()`.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from transformers.cache_utils import Cache, DynamicLayer

__all__ = ["SparseLayer", "DynamicLlavaCache", "cache_from_output"]


def _query_length(query) -> int:
    # transformers 4.57 passes `cache_position` (a tensor), 5.x the query length (an int)
    return query if isinstance(query, int) else query.shape[0]


class StorePlan(NamedTuple):
    """
    What one `SparseLayer.update()` does with its chunk; the same for every sparse layer of a call.

    kind: "append" (the whole chunk is stored after full rows), "scatter" (ragged: `dest` places each token) or
        "none" (nothing stored).
    dest: `[batch, q]` long slot of each chunk token (`new_len` = not stored), for "scatter".
    positions: `[batch, new_len]` the slots' positions after the update (-1 empty).
    old_len: stored slots carried over, for "scatter".
    """

    kind: str
    dest: Optional[torch.Tensor]
    positions: torch.Tensor
    old_len: int


def _scatter_slots(old: torch.Tensor, chunk: torch.Tensor, dest: torch.Tensor, new_len: int, old_len: int):
    """`old` `[batch, heads, width, dim]` -> `[batch, heads, new_len, dim]` with `chunk`'s tokens at `dest`."""
    batch, heads, q, dim = chunk.shape
    out = old.new_zeros((batch, old.shape[1], new_len + 1, old.shape[-1]))
    out[..., :old_len, :] = old[..., :old_len, :]
    out.scatter_(-2, dest[:, None, :, None].expand(batch, heads, q, dim), chunk)
    return out[..., :new_len, :]


class SparseLayer(DynamicLayer):
    """
    A cache layer that stores only the kept entries of each row.

    Storage:
        keys, values: `[batch, kv_heads, max_kept, head_dim]`; row `b` holds its entries in slots `[0, kept_b)`.
        positions:    `[batch, max_kept]` LongTensor, the original position of each slot's token, `-1` if empty.
    """

    is_sliding = False
    is_croppable = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.positions: Optional[torch.Tensor] = None
        self.logical_length = 0
        self._staged = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: Optional[torch.Tensor] = None):
        value_states = key_states if value_states is None else value_states
        batch, heads, _, head_dim = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_zeros((batch, heads, 0, head_dim))
        self.values = value_states.new_zeros((batch, value_states.shape[1], 0, value_states.shape[-1]))
        self.positions = torch.full((batch, 0), -1, dtype=torch.long, device=self.device)
        self.is_initialized = True

    def stage(self, store: torch.Tensor, positions: torch.Tensor, num_new_tokens: int,
              plan: Optional[StorePlan] = None) -> None:  # fmt: skip
        """
        Say what the next `update()` stores.

        Args:
            store: `[batch, q]` bool, True for the chunk tokens whose keys/values enter this layer's cache.
            positions: `[batch, q]` long, original positions of the chunk tokens.
            num_new_tokens: logical tokens this call adds (before any were dropped), for `get_seq_length()`.
            plan: `plan_store(store, positions)` of a layer with the same stored slots (the container computes it
                once for all sparse layers); computed here when None.
        """
        self._staged = (store, positions, num_new_tokens, plan)

    def plan_store(self, store: torch.Tensor, positions: torch.Tensor) -> StorePlan:
        """Where each chunk token of `store` goes in this layer's storage (one host sync, for the sizes)."""
        device = self.positions.device if self.positions is not None else store.device
        store, positions = store.to(device), positions.to(device)
        old = self.positions if self.positions is not None else positions.new_full((store.shape[0], 0), -1)
        counts = (old >= 0).sum(-1)
        new_counts = counts + store.sum(-1)
        flags = torch.stack([store.all() & (counts == old.shape[-1]).all(), store.any(),
                             new_counts.max() if new_counts.numel() else new_counts.new_zeros(())])  # fmt: skip
        append_all, any_stored, new_len = (int(v) for v in flags.tolist())
        if append_all:  # every row keeps the whole chunk and has no empty slot: storage is the concatenation
            return StorePlan("append", None, torch.cat([old, positions], dim=-1), 0)
        if not any_stored:
            return StorePlan("none", None, old, 0)
        # ragged: each row's kept chunk entries go right after its stored ones; one extra slot at the end collects
        # the entries that are not stored, then is cut off
        dest = torch.where(store, counts[:, None] + store.cumsum(-1) - 1, torch.full_like(positions, new_len))
        old_len = min(old.shape[-1], new_len)
        slots = old.new_full((old.shape[0], new_len + 1), -1)
        slots[:, :old_len] = old[:, :old_len]
        slots.scatter_(-1, dest, positions)
        return StorePlan("scatter", dest, slots[:, :new_len], old_len)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """
        Args:
            key_states, value_states: `[batch, kv_heads, q, head_dim]`, the chunk the model computes in this layer.
        Returns:
            `(keys, values)` of shape `[batch, kv_heads, max_kept + q, head_dim]`: the stored past, then the chunk.
            The model's mask for this layer follows the same order (`DynamicLlavaCache.key_positions`).
        """
        if self._staged is None:
            raise RuntimeError(
                "SparseLayer.update() was called without a staged keep mask. DynamicLlavaCache is driven by "
                "DynamicLlavaForConditionalGeneration; other models should use a plain DynamicCache."
            )
        store, positions, num_new_tokens, plan = self._staged
        self._staged = None
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if plan is None:
            plan = self.plan_store(store, positions)
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        self.logical_length += num_new_tokens
        if plan.kind == "append":
            self.keys, self.values = keys, values
        elif plan.kind == "scatter":
            dest = plan.dest.to(self.device)
            self.keys = _scatter_slots(self.keys, key_states, dest, plan.positions.shape[-1], plan.old_len)
            self.values = _scatter_slots(self.values, value_states, dest, plan.positions.shape[-1], plan.old_len)
        self.positions = plan.positions.to(self.device)
        return keys, values

    def kept_length(self) -> torch.Tensor:
        """`[batch]` long: entries stored per row."""
        if not self.is_initialized:
            return torch.zeros(0, dtype=torch.long)
        return (self.positions >= 0).sum(-1)

    def get_seq_length(self) -> int:
        """The logical length: every token this layer was shown, kept or not."""
        return self.logical_length

    def get_physical_length(self) -> int:
        return 0 if not self.is_initialized else self.keys.shape[-2]

    def get_mask_sizes(self, query, *args) -> tuple[int, int]:
        return self.get_physical_length() + _query_length(query), 0

    def get_max_cache_shape(self) -> int:
        return -1

    def get_max_length(self) -> int:
        return -1

    def crop(self, *args, **kwargs):
        raise ValueError(
            "DynamicLlavaCache cannot be cropped: its sparse layers dropped entries, so a shorter prefix of the "
            "history cannot be rebuilt (assisted decoding and DoLa need cropping). Generate without an assistant, "
            "or load the model with use_vision_predictor=False and use_output_text_predictor=False."
        )

    def _select(self, fn) -> None:
        """Apply a batch selection; storage then shrinks to the new max kept (rows may have been dropped)."""
        if self.is_initialized:
            self.keys, self.values, self.positions = fn(self.keys), fn(self.values), fn(self.positions)
            width = int(self.kept_length().max()) if self.positions.shape[0] else 0
            if width < self.positions.shape[-1]:
                self.keys = self.keys[..., :width, :].contiguous()
                self.values = self.values[..., :width, :].contiguous()
                self.positions = self.positions[:, :width].contiguous()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices])

    def reset(self) -> None:
        self.keys = self.values = self.positions = None
        self.is_initialized = False
        self.logical_length = 0
        self._staged = None


class DynamicLlavaCache(Cache):
    """
    The cache `DynamicLlavaForConditionalGeneration.generate()` builds by itself: `DynamicLayer` for layers
    `< sparse_layer`, `SparseLayer` from it on (all dense when sparsification is off).

    Per-row bookkeeping (on the device of the layer that produced it):
        kept_vision_indices: per row, LongTensor of kept indices inside the image (ascending); a list of them, one
            per image, if a row has several; an empty tensor for a row without image.
        output_text_keep: per row, BoolTensor with one decision per generated token fed back.
    """

    def __init__(self, config=None, *, num_hidden_layers: Optional[int] = None, sparse_layer: Optional[int] = None):
        if config is not None:
            text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
            num_hidden_layers = text_config.num_hidden_layers
            enabled = getattr(config, "use_vision_predictor", True) or getattr(config, "use_output_text_predictor", True)
            sparse_layer = config.sparse_layer if enabled else num_hidden_layers
        if num_hidden_layers is None or sparse_layer is None:
            raise ValueError("DynamicLlavaCache needs the model config (or num_hidden_layers and sparse_layer).")
        if not 1 <= sparse_layer <= num_hidden_layers:
            raise ValueError(f"sparse_layer={sparse_layer} must lie in 1..{num_hidden_layers}.")
        layers = [DynamicLayer() for _ in range(sparse_layer)]
        layers += [SparseLayer() for _ in range(sparse_layer, num_hidden_layers)]
        super().__init__(layers=layers)
        self.sparse_layer = sparse_layer
        self._vision: list[list[torch.Tensor]] = []
        self._output_text_keep: Optional[torch.Tensor] = None
        self._real_tokens: Optional[torch.Tensor] = None

    # ---- driven by the model -----------------------------------------------------------------------------------

    @property
    def sparse_layers(self) -> list[SparseLayer]:
        return self.layers[self.sparse_layer :]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Logical length (layer 0 is dense): what `generate()` uses for positions."""
        return self.layers[layer_idx].get_seq_length()

    def stored_positions(self) -> Optional[torch.Tensor]:
        """`[batch, max_kept]` original positions of the stored sparse slots (-1 empty), or None before prefill."""
        if not self.sparse_layers or not self.sparse_layers[0].is_initialized:
            return None
        return self.sparse_layers[0].positions

    def observe_tokens(self, token_valid: torch.Tensor) -> None:
        """Called once per forward: `[batch, q]` bool, the non-padding tokens of this call (all layers store them)."""
        real = token_valid.sum(-1)
        self._real_tokens = real if self._real_tokens is None else self._real_tokens + real.to(self._real_tokens)

    def stage_sparse_chunk(self, store: torch.Tensor, positions: torch.Tensor, num_new_tokens: int) -> None:
        """
        Called once per forward, before the sparse layers run.

        Args:
            store: `[batch, q']` bool, which tokens of the chunk the sparse layers compute are stored.
            positions: `[batch, q']` long, their original positions.
            num_new_tokens: q, the logical length of this call's chunk.
        """
        layers = self.sparse_layers
        plan = layers[0].plan_store(store, positions) if layers else None  # every sparse layer holds the same slots
        for layer in layers:
            layer.stage(store, positions, num_new_tokens, plan)

    def record_vision(self, kept: list[list[torch.Tensor]]) -> None:
        """Per row, the kept indices of each image seen in this call."""
        if not self._vision:
            self._vision = [[] for _ in kept]
        for row, images in zip(self._vision, kept):
            row.extend(images)

    def record_output_text(self, keep: torch.Tensor) -> None:
        """`[batch, n]` bool decisions of the generated tokens fed in this call."""
        prev = self._output_text_keep
        self._output_text_keep = keep if prev is None else torch.cat([prev, keep.to(prev.device)], dim=-1)

    # ---- introspection -----------------------------------------------------------------------------------------

    @property
    def kept_vision_indices(self) -> list:
        out = []
        for images in self._vision:
            if not images:
                out.append(torch.zeros(0, dtype=torch.long))
            else:
                out.append(images[0] if len(images) == 1 else list(images))
        return out

    @property
    def output_text_keep(self) -> list[torch.Tensor]:
        if self._output_text_keep is None:
            batch = 0 if self._real_tokens is None else self._real_tokens.shape[0]
            return [torch.zeros(0, dtype=torch.bool) for _ in range(batch)]
        return list(self._output_text_keep.unbind(0))

    def kept_lengths(self) -> torch.Tensor:
        """`[num_layers, batch]` long: entries physically stored per layer and row, padding never counted."""
        if self._real_tokens is None:
            return torch.zeros(len(self.layers), 0, dtype=torch.long)
        rows = []
        for layer in self.layers:
            rows.append(layer.kept_length().cpu() if isinstance(layer, SparseLayer) else self._real_tokens.cpu())
        return torch.stack(rows)

    def stored_bytes(self) -> int:
        """Bytes of key/value storage actually allocated, over all layers."""
        total = 0
        for layer in self.layers:
            if layer.is_initialized:
                total += layer.keys.numel() * layer.keys.element_size()
                total += layer.values.numel() * layer.values.element_size()
        return total

    def dense_bytes(self) -> int:
        """Bytes a stock `DynamicCache` would hold for the same inputs (every layer x batch x full length)."""
        total = 0
        length = self.get_seq_length()
        for layer in self.layers:
            if layer.is_initialized:
                batch, heads, _, head_dim = layer.keys.shape
                per_token = heads * head_dim * layer.keys.element_size()
                per_token += layer.values.shape[1] * layer.values.shape[-1] * layer.values.element_size()
                total += batch * length * per_token
        return total

    def sparsity_report(self) -> dict:
        """
        What the cache holds, for any call: per row the vision tokens kept and the generated tokens kept, and bytes.
        `kv_bytes_ratio` = stored_bytes / dense_bytes (dense = a stock DynamicCache for the same inputs).
        """
        decisions = self.output_text_keep
        vision = [v if isinstance(v, list) else [v] for v in self.kept_vision_indices]
        kept_generated = [int(d.sum()) for d in decisions]
        generated = [int(d.numel()) for d in decisions]
        stored, dense = self.stored_bytes(), self.dense_bytes()
        return {
            "sparse_layer": self.sparse_layer,
            "vision_tokens_kept": [[int(i.numel()) for i in images] for images in vision],
            "output_text_kept": kept_generated,
            "output_text_scored": generated,
            "output_text_keep_rate": (sum(kept_generated) / sum(generated)) if sum(generated) else None,
            "kept_lengths": self.kept_lengths().tolist(),
            "stored_bytes": stored,
            "dense_bytes": dense,
            "kv_bytes_ratio": (stored / dense) if dense else None,
        }

    # ---- batch operations keep the bookkeeping with its rows ---------------------------------------------------

    def _select_rows(self, fn) -> None:
        if self._real_tokens is not None:
            self._real_tokens = fn(self._real_tokens)
        if self._output_text_keep is not None:
            self._output_text_keep = fn(self._output_text_keep)
        if self._vision:
            order = fn(torch.arange(len(self._vision))).tolist()
            self._vision = [list(self._vision[i]) for i in order]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for layer in self.layers:
            layer.reorder_cache(beam_idx)
        self._select_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        for layer in self.layers:
            layer.batch_repeat_interleave(repeats)
        self._select_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for layer in self.layers:
            layer.batch_select_indices(indices)
        self._select_rows(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices])

    def crop(self, max_length: int) -> None:
        length = self.get_seq_length()
        target = max_length if max_length >= 0 else length + max_length
        if target >= length:
            return
        if self.sparse_layers:
            self.sparse_layers[0].crop(max_length)
        for layer in self.layers:
            layer.crop(max_length if _CROP_ABSOLUTE else target - length)
        if self._real_tokens is not None:  # a crop removes the newest tokens, which are real (left padding)
            self._real_tokens = (self._real_tokens - (length - target)).clamp(min=0)

    def reset(self) -> None:
        """Empty every layer and the bookkeeping (4.57's DynamicLayer.reset only zeroes in place)."""
        for layer in self.layers:
            layer.reset()
            layer.keys = layer.values = None
            layer.is_initialized = False
        self._vision, self._output_text_keep, self._real_tokens = [], None, None


# transformers 4.57's DynamicLayer.crop takes the absolute length to keep; 5.x the (negative) number to remove
_CROP_ABSOLUTE = "max_length" in DynamicLayer.crop.__code__.co_varnames[:2]


def cache_from_output(output):
    """The cache of a model output or of `generate(..., return_dict_in_generate=True)`: `cache` in transformers
    5.x, `past_key_values` in 4.57."""
    for key in ("cache", "past_key_values"):
        if key in output and output[key] is not None:
            return output[key]
    raise ValueError("this output holds no cache; call generate(..., return_dict_in_generate=True) with use_cache")
