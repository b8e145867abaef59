"""`sparse_masks.py`, the one position-tag rule behind every mask: a query sees a key iff the key's tag is at or
before the query's position; empty slots never, padding queries everything (their softmax stays finite)."""

import pytest
import torch

from dynamic_llava.sparse_masks import EMPTY, all_true, attention_mask_for, tags, visible_keys


def test_tags_are_positions_of_real_tokens_and_empty_elsewhere():
    positions = torch.tensor([[0, 1, 2], [5, 6, 7]])
    real = torch.tensor([[True, False, True], [False, False, True]])
    assert tags(positions, real).tolist() == [[0, EMPTY, 2], [EMPTY, EMPTY, 7]]


def test_a_query_sees_the_keys_tagged_at_or_before_its_position():
    keys = torch.tensor([[0, 3, 1, EMPTY]])
    queries = torch.tensor([[1, 3]])
    visible = visible_keys(keys, queries)
    assert visible.shape == (1, 1, 2, 4)
    assert visible[0, 0].tolist() == [[True, False, True, False], [True, True, True, False]]


def test_a_padding_query_sees_every_slot():
    keys = torch.tensor([[0, EMPTY]])
    visible = visible_keys(keys, torch.tensor([[0, 0]]), torch.tensor([[False, True]]))
    assert visible[0, 0].tolist() == [[True, True], [True, False]]


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_float_mask_is_zero_where_visible_and_the_dtype_minimum_elsewhere(implementation, dtype):
    visible = torch.tensor([[[[True, False]]]])
    mask = attention_mask_for(visible, implementation, dtype)
    assert mask.dtype == dtype and mask.tolist() == [[[[0.0, torch.finfo(dtype).min]]]]


def test_other_attention_implementations_are_refused_with_the_supported_ones():
    with pytest.raises(ValueError, match="attn_implementation='sdpa'.*or 'eager'"):
        attention_mask_for(torch.ones(1, 1, 1, 1, dtype=torch.bool), "flash_attention_2", torch.float16)


def test_the_decode_step_all_true_mask_is_shared_and_a_chunk_gets_its_own():
    assert all_true(2, 1, torch.device("cpu")) is all_true(2, 1, torch.device("cpu"))
    chunk = all_true(2, 3, torch.device("cpu"))
    assert chunk.shape == (2, 3) and bool(chunk.all()) and chunk is not all_true(2, 3, torch.device("cpu"))
