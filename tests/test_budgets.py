"""Per-call sparsity budgets: one loaded model compares the field's standard budgets."""

from __future__ import annotations

import pytest
import torch

from dynamic_llava.transformers_compat import cache_from_output

from fixtures.tiny import IMAGE_TOKEN_ID, tiny_model

TOKENS = 576  # LLaVA-1.5's image tokens: a 48 x 48 image in 2 x 2 patches


@pytest.fixture(scope="module")
def llava_sized():
    """The tiny model with 576 tokens per image (as LLaVA-1.5's 336 px / 14 px patches)."""
    return tiny_model(3, vision_config={"image_size": 48, "patch_size": 2}, image_seq_length=TOKENS)


def two_rows(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([[1, 5] + [IMAGE_TOKEN_ID] * TOKENS + [6, 7], [1, 8] + [IMAGE_TOKEN_ID] * TOKENS + [9, 10]])
    return {"input_ids": ids, "pixel_values": torch.randn(2, 3, 48, 48, generator=g)}


@pytest.mark.parametrize("budget", [64, 128, 192])
def test_vision_keep_tokens_per_call_keeps_exactly_that_many_per_image(llava_sized, budget):
    out = llava_sized.generate(**two_rows(), max_new_tokens=3, vision_keep_tokens=budget, return_dict_in_generate=True)
    cache = cache_from_output(out)
    assert [[len(image) for image in row] for row in cache.kept_vision_indices] == [[budget], [budget]]
    assert cache.sparsity_report()["vision_tokens_kept"] == [[budget], [budget]]
    # the model's own setting is untouched, and the next call without a budget uses it
    assert llava_sized.config.vision_keep_tokens is None
    default = cache_from_output(llava_sized.generate(**two_rows(), max_new_tokens=2, return_dict_in_generate=True))
    assert len(default.kept_vision_indices[0][0]) == int(TOKENS * llava_sized.config.vision_keep_rate)


def test_vision_keep_tokens_config_field_wins_over_the_rate(llava_sized):
    llava_sized.config.vision_keep_tokens = 100
    try:
        out = llava_sized.generate(**two_rows(), max_new_tokens=2, return_dict_in_generate=True)
        assert len(cache_from_output(out).kept_vision_indices[0][0]) == 100
        # an explicit per-call rate wins over the config's token count
        out = llava_sized.generate(**two_rows(), max_new_tokens=2, vision_keep_rate=0.5, return_dict_in_generate=True)
        assert len(cache_from_output(out).kept_vision_indices[0][0]) == 288
    finally:
        llava_sized.config.vision_keep_tokens = None


def test_output_text_predictor_off_per_call_keeps_every_generated_token(llava_sized):
    out = llava_sized.generate(
        **two_rows(), max_new_tokens=6, use_output_text_predictor=False, return_dict_in_generate=True
    )
    cache = cache_from_output(out)
    assert cache.sparsity_report()["output_text_scored"] == [0, 0]
    kept_prompt = 4 + int(TOKENS * llava_sized.config.vision_keep_rate)
    assert cache.kept_lengths()[-1].tolist() == [kept_prompt + 5, kept_prompt + 5]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"vision_keep_tokens": 0}, "integer >= 1"),
        ({"vision_keep_tokens": 577}, "more than the 576 tokens"),
        ({"vision_keep_tokens": 12.5}, "integer >= 1"),
        ({"vision_keep_rate": 0.0}, r"outside \(0, 1\]"),
        ({"vision_keep_rate": 1.01}, r"outside \(0, 1\]"),
        ({"use_output_text_predictor": "off"}, "True or False"),
        ({"vision_keep_rate": 0.001}, "keeps int"),  # 576 x 0.001 -> 0 tokens
    ],
)
def test_an_invalid_per_call_value_is_a_clear_error(llava_sized, kwargs, message):
    with pytest.raises(ValueError, match=message):
        llava_sized.generate(**two_rows(), max_new_tokens=2, **kwargs)
