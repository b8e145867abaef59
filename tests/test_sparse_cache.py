"""Property tests of the sparse cache (slot table + `SparseLayer`) against a dense, masked reference (hypothesis)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamic_llava import DynamicLlavaCache, DynamicLlavaStaticCache
from dynamic_llava.sparse_cache import SparseChunk
from dynamic_llava.sparse_masks import EMPTY, visible_keys

HEADS, DIM = 2, 3


class DenseReference:
    """Every entry ever shown, with its position and keep flag; attention masks dropped ones."""

    def __init__(self, batch):
        self.keys = torch.zeros(batch, HEADS, 0, DIM)
        self.values = torch.zeros(batch, HEADS, 0, DIM)
        self.positions = torch.zeros(batch, 0, dtype=torch.long)
        self.keep = torch.zeros(batch, 0, dtype=torch.bool)

    def attend(self, query, k, v, pos, store, valid):
        """Attention of the chunk's queries over (kept past) + (chunk, causal by position; each sees itself)."""
        keys = torch.cat([self.keys, k], dim=2)
        values = torch.cat([self.values, v], dim=2)
        key_pos = torch.cat([self.positions, pos], dim=1)
        key_ok = torch.cat([self.keep, valid], dim=1)
        visible = key_ok[:, None, :] & (key_pos[:, None, :] <= pos[:, :, None])
        out = _attention(query, keys, values, visible)
        self.keys, self.values = keys, values
        self.positions, self.keep = key_pos, torch.cat([self.keep, store & valid], dim=1)
        return out

    def select(self, index):
        self.keys, self.values = self.keys[index], self.values[index]
        self.positions, self.keep = self.positions[index], self.keep[index]


def _attention(query, keys, values, visible):
    scores = query @ keys.transpose(-1, -2)
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    return scores.softmax(-1) @ values


# the cache classes the properties hold for: (cache of 2 layers, the second sparse; the capacity of a sparse layer may
# grow): the static cache preallocates its slots (room for the longest draw: 8 chunks of 5 tokens)
CACHES = {
    "dynamic": lambda block_size: DynamicLlavaCache(num_hidden_layers=2, sparse_layer=1, block_size=block_size),
    "static": lambda block_size: DynamicLlavaStaticCache(
        num_hidden_layers=2, sparse_layer=1, block_size=block_size, max_cache_len=48
    ),
}


chunk_strategy = st.tuples(
    st.integers(1, 5),  # chunk length
    st.integers(0, 2**16),  # seed of keep mask / padding / values
)


@pytest.mark.parametrize("kind", sorted(CACHES))
@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    batch=st.integers(1, 4),
    chunks=st.lists(chunk_strategy, min_size=1, max_size=8),
    reorder_after=st.integers(0, 8),
    pad_first=st.booleans(),
    block_size=st.sampled_from([1, 3, 64]),
)
def test_sparse_layer_matches_dense_masked_reference(kind, batch, chunks, reorder_after, pad_first, block_size):
    cache = CACHES[kind](block_size)
    layer = cache.layers[1]
    ref = DenseReference(batch)
    next_pos = torch.zeros(batch, dtype=torch.long)
    for step, (length, seed) in enumerate(chunks):
        g = torch.Generator().manual_seed(seed)
        k = torch.randn(batch, HEADS, length, DIM, generator=g)
        v = torch.randn(batch, HEADS, length, DIM, generator=g)
        query = torch.randn(batch, HEADS, length, DIM, generator=g)
        store = torch.rand(batch, length, generator=g) < 0.5
        valid = torch.ones(batch, length, dtype=torch.bool)
        if step == 0 and pad_first:  # left padding: a random number of leading pads per row
            pads = torch.randint(0, length, (batch,), generator=g)
            valid = torch.arange(length)[None, :] >= pads[:, None]
        pos = next_pos[:, None] + (valid.long().cumsum(-1) - 1).clamp(min=0)
        next_pos = next_pos + valid.sum(-1)

        if cache.is_preallocated:  # (the static cache's dense layers write at the columns the call begins with)
            cache.begin_dense(pos, valid, None)
        cache.layers[0].update(k, v, 0)
        chunk = SparseChunk(valid, pos, valid, store & valid, length, is_prompt=True)
        key_positions = cache.admit(chunk)
        keys, values = layer.update(k, v)
        mask = visible_keys(key_positions, pos, valid)[:, 0]
        ours = _attention(query, keys, values, mask)
        expected = ref.attend(query, k, v, pos, store, valid)
        real = valid[:, None, :, None].expand_as(ours)  # padding queries' outputs are never used
        assert torch.allclose(ours[real], expected[real], atol=1e-5)

        # storage: each row holds exactly its kept entries, in order, left-aligned; bounded spare capacity
        counts = ref.keep.sum(-1)
        assert torch.equal(layer.kept_length(), counts)
        # (spare slots: one block, plus the tokens of the call that last grew it, dropped or not)
        largest = max(c[0] for c in chunks[: step + 1])
        if not cache.is_preallocated:  # (the static cache's capacity is fixed)
            assert int(counts.max()) <= layer.keys.shape[2] <= int(counts.max()) + block_size + largest
        for b in range(batch):
            n = int(counts[b])
            assert torch.equal(layer.keys[b, :, :n], ref.keys[b][:, ref.keep[b]])
            assert torch.equal(layer.values[b, :, :n], ref.values[b][:, ref.keep[b]])
            assert torch.equal(cache.table.positions[b, :n], ref.positions[b][ref.keep[b]])
            # empty after the kept entries; a one-token call's dropped token keeps its tag until the next call
            tail = cache.table.positions[b, n + (1 if length == 1 else 0) :]
            assert (tail == EMPTY).all()
        seen = sum(c[0] for c in chunks[: step + 1])
        assert cache.get_seq_length() == seen  # (the static cache keeps one length for all its layers)
        if not cache.is_preallocated:
            assert layer.get_seq_length() == seen

        if step == reorder_after:  # beam-style reorder, with duplicated rows
            index = torch.randint(0, batch, (batch,), generator=g)
            cache.reorder_cache(index)
            ref.select(index)
            next_pos = next_pos[index]


def test_cache_bytes_and_lengths_for_a_known_pattern():
    cache = DynamicLlavaCache(num_hidden_layers=3, sparse_layer=1)
    k = torch.randn(2, HEADS, 4, DIM)
    valid = torch.tensor([[False, True, True, True], [True, True, True, True]])
    store = torch.tensor([[False, True, False, True], [True, False, False, True]])
    pos = torch.tensor([[0, 0, 1, 2], [0, 1, 2, 3]])
    cache.update(k, k, 0)
    key_positions = cache.admit(SparseChunk(valid, pos, valid, store, 4))
    # stored first, then the dropped ones (tagged for this call only), then padding (never tagged)
    assert key_positions[:, :4].tolist() == [[0, 2, 1, EMPTY], [0, 3, 1, 2]]
    for i in (1, 2):
        cache.update(k, k, i)
    assert cache.kept_lengths().tolist() == [[3, 4], [2, 2], [2, 2]]
    entry = 2 * HEADS * DIM * 4
    assert cache.stored_bytes() == 2 * 4 * entry + 2 * (2 * 2 * entry)
    assert cache.allocated_bytes() == 2 * 4 * entry + 2 * (2 * cache.table.capacity * entry)
    assert cache.dense_bytes() == 3 * 2 * 4 * entry
    assert cache.get_seq_length() == 4
    lengths = cache.table.lengths.view(-1).tolist()
    assert [cache.table.positions[b, : lengths[b]].tolist() for b in range(2)] == [[0, 2], [0, 3]]
    assert (cache.table.positions[:, 2:] == EMPTY).all()  # dropped tokens are not kept past their call
